//! How a VM's run ends, and the timestamps and counters collected on the way.
//!
//! Devices and vCPU threads report the end of the run here; the first report wins and the VMM
//! process acts on it. Nothing the guest does can report twice in a way that matters.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The agent announced a clean shutdown and then reset the machine.
    PoweredOff,
    /// Reset (i8042 or KVM system event) without the agent's shutdown notice: with our command
    /// line (`panic=-1`) that is a kernel panic, or a reboot the agent did not ask for.
    UnexpectedReset,
    /// KVM reported the guest crashed (a paravirtual panic notification).
    GuestCrashed,
    /// Triple fault: the guest CPU shut down.
    TripleFault { rip: Option<u64> },
    /// KVM could not run the guest further (on PVM hosts: an instruction its emulator lacks).
    InternalError { suberror: u32, rip: Option<u64> },
    /// KVM could not enter the guest.
    EntryFailure { reason: u64, cpu: u32 },
    /// `KVM_RUN` itself failed.
    VcpuFailed { vcpu: u8, error: String },
    /// The host stopped the VM (`Vm::stop`): killed, not shut down. Why the host did (a
    /// signal to the VMM binary, a runtime's kill) is the host's to say.
    Stopped,
}

/// Exit status of the VMM when the guest powered off cleanly.
pub const EXIT_OK: i32 = 0;
/// Exit status when the guest crashed or KVM stopped it.
pub const EXIT_GUEST_FAILED: i32 = 3;
/// Exit status when the host stopped the VM for a reason of its own (a binary stopped by a
/// signal exits 128 + the signal instead, as a shell reports it).
pub const EXIT_STOPPED: i32 = 4;

impl ExitReason {
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PoweredOff => EXIT_OK,
            ExitReason::Stopped => EXIT_STOPPED,
            _ => EXIT_GUEST_FAILED,
        }
    }

    /// A short machine-readable name (used in metrics).
    pub fn name(&self) -> &'static str {
        match self {
            ExitReason::PoweredOff => "powered_off",
            ExitReason::UnexpectedReset => "unexpected_reset",
            ExitReason::GuestCrashed => "guest_crashed",
            ExitReason::TripleFault { .. } => "triple_fault",
            ExitReason::InternalError { .. } => "internal_error",
            ExitReason::EntryFailure { .. } => "entry_failure",
            ExitReason::VcpuFailed { .. } => "vcpu_failed",
            ExitReason::Stopped => "stopped",
        }
    }
}

fn rip_suffix(rip: &Option<u64>) -> String {
    rip.map(|r| format!(" at guest rip {r:#x}"))
        .unwrap_or_default()
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::PoweredOff => write!(f, "guest powered off"),
            ExitReason::UnexpectedReset => write!(
                f,
                "guest reset without a clean shutdown (kernel panic, or a reboot the agent did not ask for)"
            ),
            ExitReason::GuestCrashed => write!(f, "guest kernel reported a crash"),
            ExitReason::TripleFault { rip } => write!(f, "guest triple-faulted{}", rip_suffix(rip)),
            ExitReason::InternalError { suberror, rip } => {
                let what = match suberror {
                    1 => "emulation failure",
                    2 => "simultaneous exceptions",
                    3 => "delivery event error",
                    _ => "unknown",
                };
                write!(
                    f,
                    "KVM internal error {suberror} ({what}){}",
                    rip_suffix(rip)
                )
            }
            ExitReason::EntryFailure { reason, cpu } => {
                write!(
                    f,
                    "KVM failed to enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                )
            }
            ExitReason::VcpuFailed { vcpu, error } => write!(f, "vCPU {vcpu} failed: {error}"),
            ExitReason::Stopped => write!(f, "stopped by the host, guest killed"),
        }
    }
}

/// Counts of vCPU exits to the VMM, by reason.
#[derive(Default)]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub hlt: AtomicU64,
    pub interrupted: AtomicU64,
    pub other: AtomicU64,
}

impl ExitCounters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// `(name, count)` pairs in a fixed order.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        [
            ("io_in", &self.io_in),
            ("io_out", &self.io_out),
            ("mmio_read", &self.mmio_read),
            ("mmio_write", &self.mmio_write),
            ("hlt", &self.hlt),
            ("interrupted", &self.interrupted),
            ("other", &self.other),
        ]
        .into_iter()
        .map(|(name, c)| (name, c.load(Ordering::Relaxed)))
        .collect()
    }
}

/// Shared by the vCPU threads, devices and the main thread for one VM run.
pub struct Lifecycle {
    started: Instant,
    started_wall: SystemTime,
    first_run: OnceLock<Duration>,
    agent_up: OnceLock<Duration>,
    shutdown_announced: AtomicBool,
    pub exits: ExitCounters,
    ended: Mutex<Sender<ExitReason>>,
}

impl Lifecycle {
    /// `started` is when the VMM process began (as close to `main` as possible).
    pub fn new(started: Instant, started_wall: SystemTime) -> (Self, Receiver<ExitReason>) {
        let (tx, rx) = channel();
        let lifecycle = Lifecycle {
            started,
            started_wall,
            first_run: OnceLock::new(),
            agent_up: OnceLock::new(),
            shutdown_announced: AtomicBool::new(false),
            exits: ExitCounters::default(),
            ended: Mutex::new(tx),
        };
        (lifecycle, rx)
    }

    /// Reports the end of the run. Later reports are ignored by the receiver.
    pub fn end(&self, reason: ExitReason) {
        // A closed channel means the run is already over; nothing is left to tell.
        let _ = crate::bus::lock(&self.ended).send(reason);
    }

    pub fn mark_first_run(&self) {
        let elapsed = self.started.elapsed();
        tracing::debug!(elapsed_us = elapsed.as_micros() as u64, "first KVM_RUN");
        let _ = self.first_run.set(elapsed);
    }

    /// The guest agent's boot marker.
    pub fn mark_agent_up(&self) {
        if self.agent_up.set(self.started.elapsed()).is_ok() {
            tracing::info!(
                elapsed_ms = self.started.elapsed().as_millis() as u64,
                "guest agent is up"
            );
        }
    }

    /// The agent's notice that a clean shutdown follows.
    pub fn announce_shutdown(&self) {
        self.shutdown_announced.store(true, Ordering::SeqCst);
    }

    /// Whether the agent has announced a clean shutdown (kept by snapshots).
    pub fn shutdown_announced(&self) -> bool {
        self.shutdown_announced.load(Ordering::SeqCst)
    }

    /// The machine asked to be reset (i8042 0xFE or a KVM reset event).
    pub fn reset_requested(&self) {
        if self.shutdown_announced.load(Ordering::SeqCst) {
            self.end(ExitReason::PoweredOff);
        } else {
            self.end(ExitReason::UnexpectedReset);
        }
    }

    pub fn first_run(&self) -> Option<Duration> {
        self.first_run.get().copied()
    }

    pub fn agent_up(&self) -> Option<Duration> {
        self.agent_up.get().copied()
    }

    /// Wall-clock time (ns since the epoch) of an instant measured from the start.
    pub fn wall_ns(&self, since_start: Duration) -> u128 {
        (self.started_wall + since_start)
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_after_notice_is_a_power_off() {
        let (l, rx) = Lifecycle::new(Instant::now(), SystemTime::now());
        l.announce_shutdown();
        l.reset_requested();
        assert_eq!(rx.recv().unwrap(), ExitReason::PoweredOff);
    }

    #[test]
    fn reset_without_notice_is_a_failure() {
        let (l, rx) = Lifecycle::new(Instant::now(), SystemTime::now());
        l.reset_requested();
        let reason = rx.recv().unwrap();
        assert_eq!(reason, ExitReason::UnexpectedReset);
        assert_eq!(reason.exit_code(), EXIT_GUEST_FAILED);
    }

    #[test]
    fn first_report_wins_and_marks_are_kept_once() {
        let (l, rx) = Lifecycle::new(Instant::now(), SystemTime::now());
        l.end(ExitReason::TripleFault { rip: Some(0x10) });
        l.end(ExitReason::PoweredOff);
        assert_eq!(
            rx.recv().unwrap(),
            ExitReason::TripleFault { rip: Some(0x10) }
        );
        l.mark_agent_up();
        let first = l.agent_up().unwrap();
        l.mark_agent_up();
        assert_eq!(l.agent_up().unwrap(), first);
    }

    #[test]
    fn reasons_read_as_one_line() {
        let r = ExitReason::InternalError {
            suberror: 1,
            rip: Some(0xffffffff81000000),
        };
        assert_eq!(
            r.to_string(),
            "KVM internal error 1 (emulation failure) at guest rip 0xffffffff81000000"
        );
        assert!(!ExitReason::UnexpectedReset.to_string().contains('\n'));
    }
}
