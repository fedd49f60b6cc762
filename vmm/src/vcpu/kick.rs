//! Getting a vCPU thread out of `KVM_RUN` from another thread, as Firecracker does: a real-time
//! signal whose handler sets `kvm_run.immediate_exit` on the vCPU it interrupts.
//!
//! A signal alone is not enough: one that lands just before the thread enters `KVM_RUN` would be
//! handled in user space and the thread would then run the guest until its next exit, which may
//! be never (a halted guest). With `immediate_exit` set, that next `KVM_RUN` returns `EINTR` at
//! once; the run loop then sees the host's request. The handler runs on the vCPU thread itself,
//! so it reaches that thread's `kvm_run` through a thread-local pointer.

use std::ptr;
use std::sync::Once;
use std::sync::atomic::{AtomicPtr, Ordering};

use kvm_bindings::kvm_run;

thread_local! {
    /// This thread's vCPU `kvm_run` page while it may be kicked; null otherwise. Const-initialised
    /// with no destructor, so reading it from a signal handler allocates nothing and cannot fail.
    static KVM_RUN: AtomicPtr<kvm_run> = const { AtomicPtr::new(ptr::null_mut()) };
}

/// The kick signal. Real-time, so nothing else in the process (glibc's own RT signals sit
/// below SIGRTMIN) and no default disposition a caller relies on.
pub fn signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN
        .try_with(|p| p.load(Ordering::SeqCst))
        .unwrap_or(ptr::null_mut());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, published by `arm` and
        // withdrawn by `disarm` before the mapping goes away; a byte store is async-signal-safe.
        unsafe { ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
    }
}

/// Installs the kick handler (once per process). Without SA_RESTART, so `KVM_RUN` returns
/// `EINTR` instead of being restarted.
pub fn install_handler() -> std::io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: sigaction is plain data, zeroed then filled in; sigemptyset initialises its
        // mask; the handler has the SA_SIGINFO signature and only touches its thread's kvm_run.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_kick as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal(), &action, ptr::null_mut())
        };
        if rc != 0 {
            result = Err(std::io::Error::last_os_error());
        }
    });
    result
}

/// Makes the calling thread kickable: publishes `run` (this thread's vCPU `kvm_run`) to the
/// handler and unblocks the signal, which an embedder may have blocked before building the VM
/// (every thread inherits the mask of the thread that created it).
pub fn arm(run: *mut kvm_run) -> std::io::Result<()> {
    KVM_RUN.with(|p| p.store(run, Ordering::SeqCst));
    // SAFETY: `set` is a local sigset_t initialised by sigemptyset; the calls only change this
    // thread's signal mask.
    let rc = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Withdraws the `kvm_run` pointer before the vCPU fd (and its mapping) is dropped; a kick that
/// arrives later finds nothing to mark.
pub fn disarm() {
    KVM_RUN.with(|p| p.store(ptr::null_mut(), Ordering::SeqCst));
}

/// Sends the kick to `thread`. The caller guarantees the thread has not been joined.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: pthread_kill on a thread id the caller guarantees is still valid (not joined),
    // with a signal whose handler is installed before any vCPU thread is started.
    let rc = unsafe { libc::pthread_kill(thread, signal()) };
    if rc != 0 {
        tracing::warn!(
            "cannot kick a vCPU thread: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
}
