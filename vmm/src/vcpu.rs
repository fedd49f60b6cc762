//! One vCPU thread: runs the guest and dispatches its exits to the buses.

use std::sync::Arc;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::bus::Bus;
use crate::lifecycle::{ExitCounters, ExitReason, Lifecycle};

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
    Stop(ExitReason),
    /// Already reported to the lifecycle (a reset, which the lifecycle classifies itself).
    Reported,
    /// Needs the register state to describe (the exit's borrow of the vCPU has ended).
    TripleFault,
    InternalError,
}

impl Vcpu {
    /// Runs until the guest stops this vCPU; the reason goes to the lifecycle.
    pub fn run(mut self) {
        if self.id == 0 {
            self.lifecycle.mark_first_run();
        }
        let reason = loop {
            match self.run_once() {
                Next::Continue => {}
                Next::Reported => return,
                Next::Stop(reason) => break reason,
                Next::TripleFault => break ExitReason::TripleFault { rip: self.rip() },
                Next::InternalError => {
                    // SAFETY: KVM filled the `internal` member of the exit union for this exit
                    // (KVM_EXIT_INTERNAL_ERROR), and it is plain integers.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    break ExitReason::InternalError {
                        suberror,
                        rip: self.rip(),
                    };
                }
            }
        };
        self.lifecycle.end(reason);
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
                    Next::Continue
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
                Next::Continue
            }
            Err(e) => Next::Stop(ExitReason::VcpuFailed {
                vcpu: self.id,
                error: e.to_string(),
            }),
        }
    }
}
