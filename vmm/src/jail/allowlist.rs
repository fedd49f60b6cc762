//! Which system calls each jailed thread may make; `docs/security.md` says why each is there.
//! Found by reading what the threads run and checked with `strace -f` over boots, restores,
//! snapshots and network traffic; a missing call shows as the VMM killed by SIGSYS, with the
//! call's number in the kernel log (`audit: type=1326 ... syscall=N`).

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::ioctls;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs `KVM_RUN` and the MMIO/PIO exits, which reach the devices' register code.
    Vcpu,
    /// The device thread (virtqueues, TAPs, vsock sockets, disk files) and the supervisor,
    /// which stops it and closes the devices' host sides when the VM ends.
    Devices,
    /// The virtio-fs file server's thread: its queues, and file system calls on the
    /// descriptors it holds of the shares.
    Files,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Vcpu => "vCPU",
            Role::Devices => "device",
            Role::Files => "file server",
        }
    }

    /// Capabilities the thread keeps (bit N is capability N): the file server acts on shared
    /// files for the guest's users, as the kernel would for root in a container (ownership
    /// and modes set, files reached whatever their permission bits); every other thread none.
    pub fn kept_capabilities(self) -> u64 {
        match self {
            // <linux/capability.h>: CAP_CHOWN 0, CAP_DAC_OVERRIDE 1, CAP_FOWNER 3. Not
            // CAP_FSETID: with it, a write to a set-user-ID file would keep the bit (the
            // kernel clears it for writers without). Not CAP_DAC_READ_SEARCH: no handle
            // calls (`open_by_handle_at`) are made.
            Role::Files => 0b1011,
            _ => 0,
        }
    }

    pub fn rules(self) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for call in COMMON {
            rules.insert(call, vec![]);
        }
        rules.insert(libc::SYS_mmap, vec![no_exec(2)?]);
        rules.insert(libc::SYS_mprotect, vec![no_exec(2)?]);
        match self {
            Role::Vcpu => {
                for call in VCPU {
                    rules.insert(call, vec![]);
                }
                let mut allowed = vec![ioctls::KVM_RUN, ioctls::KVM_GET_TSC_KHZ];
                allowed.extend(ioctls::VCPU_STATE_READS);
                allowed.extend([ioctls::TUNSETOFFLOAD, ioctls::FIONBIO]);
                rules.insert(libc::SYS_ioctl, one_of(1, &allowed)?);
            }
            Role::Devices => {
                for call in DEVICES {
                    rules.insert(call, vec![]);
                }
                // Host ends of guest-initiated vsock connections; nothing but Unix sockets.
                rules.insert(libc::SYS_socket, one_of(0, &[libc::AF_UNIX as u64])?);
                rules.insert(
                    libc::SYS_ioctl,
                    one_of(
                        1,
                        &[ioctls::FIONBIO, ioctls::FIONREAD, ioctls::TUNSETOFFLOAD],
                    )?,
                );
            }
            Role::Files => {
                for call in FILES {
                    rules.insert(call, vec![]);
                }
            }
        }
        Ok(rules)
    }
}

/// Every thread: memory, locks, its own signals, time, logging (a `write` to stderr or the log
/// file) and leaving.
const COMMON: [i64; 27] = [
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    // The per-thread keys of std's HashMap come from it the first time a thread makes one.
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_shutdown,
];

/// A vCPU's MMIO write can reset or activate a device: close or shut its host sockets, arm
/// its timer, move its fds in the device thread's epoll.
const VCPU: [i64; 2] = [libc::SYS_epoll_ctl, libc::SYS_timerfd_settime];

const DEVICES: [i64; 22] = [
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_getsockopt,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// The file server: its event loop, and the calls of `devices/virtio/fs/host.rs`, each on a
/// descriptor it holds (`openat` of one checked name under a share's node, `/proc/self/fd`
/// to reopen a node). No `execve`, no sockets, no `ioctl`.
const FILES: [i64; 28] = [
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    // glibc's renameat2 without flags is renameat.
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_readlinkat,
    libc::SYS_fchownat,
    libc::SYS_chmod,
    libc::SYS_fchmodat,
    libc::SYS_utimensat,
];

/// Argument `arg` (a `prot`) without PROT_EXEC: no thread maps code after the build.
fn no_exec(arg: u8) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )?])
}

/// Argument `arg` equal to one of `values` (rules of one call are or-ed).
fn one_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, BackendError> {
    values
        .iter()
        .map(|&value| {
            SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                value,
            )?])
        })
        .collect()
}
