//! The VMM's jail (Firecracker's model): once the VM is built, every thread that serves the
//! guest (the vCPUs, the device thread and the supervisor) drops its capabilities, sets
//! `no_new_privs` and runs under a seccomp allowlist of the system calls it needs; any other
//! call kills the whole process (`SECCOMP_RET_KILL_PROCESS`), so a guest that takes over a
//! device's code cannot open files, make sockets other than Unix ones, exec, ptrace or map
//! executable memory. The process is made non-dumpable and guest memory is left out of core
//! dumps, so a crash does not write the guest's secrets to disk.
//!
//! Filters, capabilities and `no_new_privs` are per thread in Linux: the embedder's own threads
//! (the runtime's monitor runs the OCI hooks and carries networks from them) are untouched.
//! The allowlists are in `allowlist.rs`; `docs/security.md` says why each call is there.

mod allowlist;
mod ioctls;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use allowlist::Role;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot compile the {role} seccomp filter: {source}")]
    Compile {
        role: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot drop the capabilities of the {role} thread: {source}")]
    Capabilities {
        role: &'static str,
        source: std::io::Error,
    },
    #[error("cannot install the {role} seccomp filter: {source}")]
    Install {
        role: &'static str,
        source: seccompiler::Error,
    },
}

/// Whether VMs built from now on jail their threads. On unless the embedder turned it off
/// (`cocoon-vmm --no-seccomp`, `seccomp = false` in cocoon's config): a process-wide policy,
/// as seccomp itself is one per process and nothing else would want two.
static SECCOMP: AtomicBool = AtomicBool::new(true);

pub fn set_seccomp(enabled: bool) {
    SECCOMP.store(enabled, Ordering::SeqCst);
}

pub fn seccomp_enabled() -> bool {
    SECCOMP.load(Ordering::SeqCst)
}

/// The compiled filters for one VM's threads, or none when the jail is off.
#[derive(Clone)]
pub struct Jail {
    filters: Option<Filters>,
}

#[derive(Clone)]
struct Filters {
    vcpu: BpfProgram,
    devices: BpfProgram,
    files: BpfProgram,
}

impl Jail {
    /// Compiles the filters (before any thread is started, so a bad one fails the build).
    pub fn new() -> Result<Jail, JailError> {
        if !seccomp_enabled() {
            tracing::warn!("seccomp is off: the VMM's threads run without a system call filter");
            return Ok(Jail { filters: None });
        }
        Ok(Jail {
            filters: Some(Filters {
                vcpu: compile(Role::Vcpu)?,
                devices: compile(Role::Devices)?,
                files: compile(Role::Files)?,
            }),
        })
    }

    /// Jails the calling thread for `role`. Irreversible.
    pub fn enter(&self, role: Role) -> Result<(), JailError> {
        let Some(filters) = &self.filters else {
            return Ok(());
        };
        drop_capabilities(role.kept_capabilities()).map_err(|source| JailError::Capabilities {
            role: role.name(),
            source,
        })?;
        let program = match role {
            Role::Vcpu => &filters.vcpu,
            Role::Devices => &filters.devices,
            Role::Files => &filters.files,
        };
        // Sets no_new_privs first, which seccomp requires of a thread without CAP_SYS_ADMIN.
        seccompiler::apply_filter(program).map_err(|source| JailError::Install {
            role: role.name(),
            source,
        })
    }
}

impl Jail {
    /// [`Jail::enter`], with the outcome sent to the thread that started this one (which
    /// waits for it before it goes on); whether the jail holds.
    pub fn enter_reporting(
        &self,
        role: Role,
        report: &std::sync::mpsc::Sender<Result<(), JailError>>,
    ) -> bool {
        let entered = self.enter(role);
        let held = entered.is_ok();
        let _ = report.send(entered);
        held
    }
}

fn compile(role: Role) -> Result<BpfProgram, JailError> {
    let error = |source| JailError::Compile {
        role: role.name(),
        source,
    };
    let filter = SeccompFilter::new(
        role.rules().map_err(error)?,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(error)?;
    filter.try_into().map_err(error)
}

/// Empties the calling thread's effective, permitted and inheritable sets (ambient ones go
/// with the permitted set) but for the bits of `keep` the thread holds. Serving the guest needs
/// no privilege but the file server's: every fd is open already.
fn drop_capabilities(keep: u64) -> std::io::Result<()> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    if keep != 0 {
        // SAFETY: capget writes two data structs (version 3) into our live array.
        let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for (half, set) in data.iter_mut().enumerate() {
            let keep = (keep >> (32 * half)) as u32;
            set.permitted &= keep;
            set.effective = set.permitted;
            set.inheritable = 0;
        }
    }
    // SAFETY: capset reads a header and two data structs (version 3), both ours and live; pid 0
    // is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct` of <linux/capability.h> (libc does not have it).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`: one of the two 32-bit halves of the sets.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Process-wide parts, for a VM about to start: not dumpable (no core file, no ptrace attach
/// by a same-uid process, `/proc/PID` files root's), and guest RAM left out of core dumps
/// whatever the dumpable flag later becomes.
pub fn harden_process(guest_mappings: &[(usize, usize)]) {
    if !seccomp_enabled() {
        return;
    }
    // SAFETY: PR_SET_DUMPABLE takes an integer and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        tracing::warn!(
            "cannot make the VMM non-dumpable: {}",
            std::io::Error::last_os_error()
        );
    }
    for &(addr, size) in guest_mappings {
        // SAFETY: (addr, size) is a guest memory mapping this process made and keeps for the
        // VM's life; MADV_DONTDUMP only sets a flag on it and changes no contents.
        let rc = unsafe { libc::madvise(addr as *mut libc::c_void, size, libc::MADV_DONTDUMP) };
        if rc != 0 {
            tracing::warn!(
                "cannot leave guest memory at {addr:#x} out of core dumps: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
