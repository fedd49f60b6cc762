//! Whether a guest is getting anywhere. A wait on the guest (its boot, an agent's reply) is
//! judged by the work the VM's threads do, not by the wall clock: a loaded host runs a guest
//! slowly, and that guest is waited for; a guest that is stuck is not, whatever the load.
//!
//! Stuck means one of two things. Spinning: the vCPUs have run for the CPU budget without the
//! awaited answer (a boot costs a few seconds of CPU, or tens on a host that emulates guest
//! kernel code; a guest looping in early boot never stops costing). Idle: for the idle limit
//! the vCPUs have neither run nor waited to run (a halted or deadlocked guest, or an
//! agent that never started). A guest starved by other work waits to run, so it is not idle.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How much no progress a wait on the guest takes before it gives up (`config.toml`:
/// `guest_cpu_budget_secs`, `guest_idle_secs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestLimits {
    /// vCPU time the guest may spend without giving the answer awaited.
    pub cpu_budget: Duration,
    /// How long the guest may do nothing at all while an answer is awaited.
    pub idle: Duration,
}

impl Default for GuestLimits {
    fn default() -> GuestLimits {
        GuestLimits {
            cpu_budget: Duration::from_secs(DEFAULT_CPU_BUDGET_SECS),
            idle: Duration::from_secs(DEFAULT_IDLE_SECS),
        }
    }
}

/// A cold boot here costs 15-25 s of vCPU time (guest kernel code is emulated on a PVM host):
/// ten times that is a guest that will not come up.
pub const DEFAULT_CPU_BUDGET_SECS: u64 = 300;
/// Longer than anything the agent waits for on the host (a disk swapped in at restore: 30 s).
pub const DEFAULT_IDLE_SECS: u64 = 60;

/// Below this share of one CPU, and runnable in fewer than `RUNNABLE_SHARE_PERCENT` of the
/// looks, a window counts as idle. An idle tickless guest costs next to nothing, but the
/// host's own knocking (a connection the guest refuses while its agent is not up) costs it a
/// little: that is not progress.
const CPU_SHARE_PERCENT: u32 = 15;
const RUNNABLE_SHARE_PERCENT: u32 = 10;

/// One look at the VM's threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// CPU time of the vCPU threads so far.
    pub cpu: Duration,
    /// Some vCPU was running or waiting to run (or in the host's I/O, state D). The device
    /// thread is not looked at: it works for the host too (a connection knocking before the
    /// guest listens keeps it busy), which says nothing of the guest.
    pub runnable: bool,
}

/// Reads the VM threads of one process (the VMM: a container's monitor) from `/proc`.
#[derive(Debug, Clone)]
pub struct Probe {
    tasks: PathBuf,
}

/// The name the VMM gives its vCPU threads (`vmm/src/vm.rs`), with their number after it.
const VCPU_THREAD: &str = "cocoon-vcpu";

impl Probe {
    pub fn of_process(pid: i32) -> Probe {
        Probe {
            tasks: PathBuf::from(format!("/proc/{pid}/task")),
        }
    }

    /// The process's VM threads now; an error once the process is gone.
    pub fn sample(&self) -> std::io::Result<Sample> {
        let mut sample = Sample::default();
        for task in std::fs::read_dir(&self.tasks)? {
            let Ok(stat) = std::fs::read_to_string(task?.path().join("stat")) else {
                continue; // a thread that ended meanwhile
            };
            if let Some(thread) = parse_stat(&stat)
                && thread.name.starts_with(VCPU_THREAD)
            {
                sample.cpu += thread.cpu;
                sample.runnable |= thread.runnable;
            }
        }
        Ok(sample)
    }
}

struct ThreadStat<'a> {
    name: &'a str,
    runnable: bool,
    cpu: Duration,
}

/// `/proc/PID/task/TID/stat`: `tid (name) state ... utime stime ...` (proc(5)); the name may
/// hold spaces and parentheses, so the fields are counted from its last `)`.
fn parse_stat(stat: &str) -> Option<ThreadStat<'_>> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?;
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // Fields 3 (state), 14 (utime) and 15 (stime), counted from 1 with the name as field 2.
    let state = fields.first()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(ThreadStat {
        name,
        runnable: *state == "R" || *state == "D",
        cpu: ticks(utime.saturating_add(stime)),
    })
}

fn ticks(count: u64) -> Duration {
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|hz| *hz > 0).unwrap_or(100);
    Duration::from_nanos(count.saturating_mul(1_000_000_000 / hz))
}

/// Why a wait on the guest gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stuck {
    #[error(
        "its vCPUs ran for {} s of CPU time without it (guest_cpu_budget_secs = {})",
        .used.as_secs(), .budget.as_secs()
    )]
    Spinning { used: Duration, budget: Duration },
    #[error(
        "the guest did nothing for {} s (guest_idle_secs = {})",
        .idle.as_secs(), .limit.as_secs()
    )]
    Idle { idle: Duration, limit: Duration },
    #[error("the VMM process is gone ({0})")]
    Gone(String),
}

/// One wait on a guest: looked at now and then, it says when to give up.
#[derive(Debug)]
pub struct Watch {
    probe: Probe,
    limits: GuestLimits,
    judge: Option<Judge>,
}

impl Watch {
    pub fn new(probe: Probe, limits: GuestLimits) -> Watch {
        Watch {
            probe,
            limits,
            judge: None,
        }
    }

    /// Looks at the guest now: `Err` once it is stuck.
    pub fn check(&mut self) -> Result<(), Stuck> {
        let sample = self
            .probe
            .sample()
            .map_err(|e| Stuck::Gone(e.to_string()))?;
        let now = Instant::now();
        match &mut self.judge {
            Some(judge) => judge.look(now, sample),
            None => {
                self.judge = Some(Judge::new(self.limits, now, sample));
                Ok(())
            }
        }
    }
}

/// The arithmetic of a [`Watch`], apart from `/proc` and the clock.
#[derive(Debug)]
struct Judge {
    limits: GuestLimits,
    /// CPU time when the wait began.
    base_cpu: Duration,
    window_start: Instant,
    window_cpu: Duration,
    looks: u32,
    runnable_looks: u32,
}

impl Judge {
    fn new(limits: GuestLimits, now: Instant, first: Sample) -> Judge {
        Judge {
            limits,
            base_cpu: first.cpu,
            window_start: now,
            window_cpu: first.cpu,
            looks: 0,
            runnable_looks: 0,
        }
    }

    fn look(&mut self, now: Instant, sample: Sample) -> Result<(), Stuck> {
        let used = sample.cpu.saturating_sub(self.base_cpu);
        if used > self.limits.cpu_budget {
            return Err(Stuck::Spinning {
                used,
                budget: self.limits.cpu_budget,
            });
        }
        self.looks += 1;
        self.runnable_looks += u32::from(sample.runnable);
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed < self.limits.idle {
            return Ok(());
        }
        let worked = sample.cpu.saturating_sub(self.window_cpu);
        let busy = worked * 100 >= elapsed * CPU_SHARE_PERCENT
            || self.runnable_looks * 100 >= self.looks * RUNNABLE_SHARE_PERCENT;
        if !busy {
            return Err(Stuck::Idle {
                idle: elapsed,
                limit: self.limits.idle,
            });
        }
        self.window_start = now;
        self.window_cpu = sample.cpu;
        self.looks = 0;
        self.runnable_looks = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: GuestLimits = GuestLimits {
        cpu_budget: Duration::from_secs(100),
        idle: Duration::from_secs(10),
    };

    fn sample(cpu_ms: u64, runnable: bool) -> Sample {
        Sample {
            cpu: Duration::from_millis(cpu_ms),
            runnable,
        }
    }

    /// Feeds a look every second for `secs` seconds from `start`, the CPU growing by
    /// `cpu_ms_per_sec` and runnable as `runnable(second)` says.
    fn run(
        judge: &mut Judge,
        start: Instant,
        secs: u64,
        cpu_ms_per_sec: u64,
        runnable: impl Fn(u64) -> bool,
    ) -> Result<u64, Stuck> {
        for s in 1..=secs {
            judge.look(
                start + Duration::from_secs(s),
                sample(5_000 + s * cpu_ms_per_sec, runnable(s)),
            )?;
        }
        Ok(secs)
    }

    #[test]
    fn a_guest_that_works_or_waits_to_run_is_waited_for() {
        let start = Instant::now();
        // Working slowly: a third of a CPU for five minutes (under the CPU budget).
        let mut judge = Judge::new(LIMITS, start, sample(5_000, false));
        assert_eq!(run(&mut judge, start, 300, 300, |_| false), Ok(300));
        // Starved: no CPU at all, but runnable in every fifth look.
        let mut judge = Judge::new(LIMITS, start, sample(5_000, false));
        assert_eq!(run(&mut judge, start, 600, 0, |s| s % 5 == 0), Ok(600));
    }

    #[test]
    fn a_guest_that_does_nothing_is_stuck_after_the_idle_limit() {
        let start = Instant::now();
        let mut judge = Judge::new(LIMITS, start, sample(5_000, false));
        // Busy for a minute, then halted (a tick now and then: 1 ms in 10 s).
        run(&mut judge, start, 60, 500, |_| true).unwrap();
        let later = start + Duration::from_secs(60);
        let mut err = None;
        for s in 1..=30 {
            let cpu = 5_000 + 60 * 500 + s / 10;
            if let Err(e) = judge.look(later + Duration::from_secs(s), sample(cpu, false)) {
                err = Some((s, e));
                break;
            }
        }
        let (after, err) = err.expect("an idle guest is stuck");
        assert!((10..=20).contains(&after), "stuck after {after} s");
        assert!(matches!(err, Stuck::Idle { .. }), "{err}");
        assert!(err.to_string().contains("guest_idle_secs = 10"), "{err}");
    }

    #[test]
    fn a_guest_that_spins_is_stuck_at_the_cpu_budget() {
        let start = Instant::now();
        let mut judge = Judge::new(LIMITS, start, sample(5_000, true));
        // A full CPU: the budget of 100 s is used up in about 100 s.
        let err = run(&mut judge, start, 1_000, 1_000, |_| true).unwrap_err();
        match err {
            Stuck::Spinning { used, .. } => assert_eq!(used.as_secs(), 101),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn stat_lines_are_read_past_odd_names() {
        let line = "42 (cocoon-vcpu0) R 1 1 1 0 -1 4194560 10 0 0 0 250 50 0 0 20 0 3 0 1 0 0";
        let t = parse_stat(line).unwrap();
        assert_eq!(t.name, "cocoon-vcpu0");
        assert!(t.runnable);
        assert_eq!(t.cpu, ticks(300));
        let odd = "7 (a) b (c)) S 1 1 1 0 -1 0 0 0 0 0 7 3 0 0 20 0 1 0 1 0 0";
        let t = parse_stat(odd).unwrap();
        assert_eq!((t.name, t.runnable, t.cpu), ("a) b (c)", false, ticks(10)));
        assert!(parse_stat("garbage").is_none());
    }

    /// The probe on this process: a busy thread named as a vCPU shows its CPU time, an idle
    /// one shows none; other threads are not counted.
    #[test]
    fn the_probe_reads_the_vcpu_threads_of_a_process() {
        let probe = Probe::of_process(std::process::id() as i32);
        let before = probe.sample().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let busy = std::thread::Builder::new()
            .name("cocoon-vcpu9".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let during = probe.sample().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        busy.join().unwrap();
        assert!(during.runnable, "a spinning vCPU thread is runnable");
        assert!(
            during.cpu >= before.cpu + Duration::from_millis(100),
            "{during:?}"
        );
        assert!(Probe::of_process(i32::MAX).sample().is_err());
    }
}
