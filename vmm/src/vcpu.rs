//! One vCPU thread: runs the guest and dispatches its exits to the buses, parking between
//! runs when the host pauses the VM (`control.rs`) and leaving when the VM ends.

pub mod control;
pub mod kick;
pub mod persist;

use std::sync::Arc;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::bus::Bus;
use crate::lifecycle::{ExitCounters, ExitReason, Lifecycle};

pub use control::{Request, RunControl, VcpuState};

/// The run control of a vCPU thread, whose commands run on its `VcpuFd`.
pub type VcpuControl = RunControl<VcpuFd>;

pub struct Vcpu {
    pub fd: VcpuFd,
    pub id: u8,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub lifecycle: Arc<Lifecycle>,
}

/// What the loop does after one exit.
enum Next {
    Continue,
    /// `KVM_RUN` was interrupted (a kick, or a signal of the embedder's): look at the host's
    /// request before entering again.
    Interrupted,
    Stop(ExitReason),
    /// Already reported to the lifecycle (a reset, which the lifecycle classifies itself).
    Reported,
    /// Needs the register state to describe (the exit's borrow of the vCPU has ended).
    TripleFault,
    InternalError,
}

/// Why the run loop returned to the thread's main loop.
enum Left {
    /// The host asked for a pause or a stop.
    Asked,
    /// The guest ended the VM from this vCPU; the reason is reported.
    Ended,
}

impl Vcpu {
    /// The thread's body: parked until the host resumes it, running until asked to pause
    /// (back to the park) or stop, or until the guest ends the VM.
    pub fn run(mut self, control: Arc<VcpuControl>) {
        /// Marks the thread gone however it leaves (a panic included: the supervisor waits
        /// for this before joining), after withdrawing the kvm_run pointer from the kick
        /// handler and before the fd (and its mapping) is dropped with `self`.
        struct Leaving<'a>(&'a VcpuControl);
        impl Drop for Leaving<'_> {
            fn drop(&mut self) {
                kick::disarm();
                self.0.exited();
            }
        }
        let _leaving = Leaving(&control);
        if let Err(e) = kick::arm(self.fd.get_kvm_run()) {
            // Unkickable, this vCPU could not be paused or stopped: end the VM instead.
            self.lifecycle.end(ExitReason::VcpuFailed {
                vcpu: self.id,
                error: format!("cannot unblock the kick signal: {e}"),
            });
        } else {
            let mut first = true;
            while control.park(&mut self.fd) == control::Resume::Run {
                if first && self.id == 0 {
                    self.lifecycle.mark_first_run();
                }
                first = false;
                match self.run_until_left(&control) {
                    Left::Asked => {}
                    Left::Ended => break,
                }
            }
        }
    }

    fn run_until_left(&mut self, control: &VcpuControl) -> Left {
        loop {
            // Clear a kick already served, then look at the request: in this order, a kick
            // sent after the look sets immediate_exit again and the next KVM_RUN returns at
            // once, so no request is lost between the look and the entry.
            self.fd.set_kvm_immediate_exit(0);
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            if control.should_leave() {
                return Left::Asked;
            }
            let reason = match self.run_once() {
                Next::Continue | Next::Interrupted => continue,
                Next::Reported => return Left::Ended,
                Next::Stop(reason) => reason,
                Next::TripleFault => ExitReason::TripleFault { rip: self.rip() },
                Next::InternalError => {
                    // SAFETY: KVM filled the `internal` member of the exit union for this exit
                    // (KVM_EXIT_INTERNAL_ERROR), and it is plain integers.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    ExitReason::InternalError {
                        suberror,
                        rip: self.rip(),
                    }
                }
            };
            self.lifecycle.end(reason);
            return Left::Ended;
        }
    }

    fn rip(&self) -> Option<u64> {
        self.fd.get_regs().ok().map(|r| r.rip)
    }

    fn run_once(&mut self) -> Next {
        let exits = &self.lifecycle.exits;
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => {
                    ExitCounters::bump(&exits.io_out);
                    self.pio.write(port.into(), data);
                    Next::Continue
                }
                VcpuExit::IoIn(port, data) => {
                    ExitCounters::bump(&exits.io_in);
                    self.pio.read(port.into(), data);
                    Next::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    ExitCounters::bump(&exits.mmio_read);
                    self.mmio.read(addr, data);
                    Next::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    ExitCounters::bump(&exits.mmio_write);
                    self.mmio.write(addr, data);
                    Next::Continue
                }
                // With the in-kernel LAPIC, HLT is handled by KVM; an exit here is harmless.
                VcpuExit::Hlt => {
                    ExitCounters::bump(&exits.hlt);
                    Next::Continue
                }
                VcpuExit::Shutdown => Next::TripleFault,
                VcpuExit::InternalError => Next::InternalError,
                VcpuExit::FailEntry(reason, cpu) => {
                    Next::Stop(ExitReason::EntryFailure { reason, cpu })
                }
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_RESET | KVM_SYSTEM_EVENT_SHUTDOWN => {
                        self.lifecycle.reset_requested();
                        Next::Reported
                    }
                    KVM_SYSTEM_EVENT_CRASH => Next::Stop(ExitReason::GuestCrashed),
                    _ => Next::Continue,
                },
                VcpuExit::Intr => {
                    ExitCounters::bump(&exits.interrupted);
                    Next::Interrupted
                }
                other => {
                    ExitCounters::bump(&exits.other);
                    Next::Stop(ExitReason::VcpuFailed {
                        vcpu: self.id,
                        error: format!("unhandled exit {other:?}"),
                    })
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                ExitCounters::bump(&exits.interrupted);
                Next::Interrupted
            }
            Err(e) => Next::Stop(ExitReason::VcpuFailed {
                vcpu: self.id,
                error: e.to_string(),
            }),
        }
    }
}
