//! The classic stop policy for embedders that want it (the `cocoon-vmm` binary): SIGTERM,
//! SIGINT and SIGHUP end the run like any other reason, so the embedder still cleans up its
//! sockets and reports, instead of dying where it stands. Neither the builder nor the VM
//! handle uses this: what a signal means is the embedder's choice.

/// The stop signals, blocked in the calling thread (and so in every thread it creates later).
pub struct StopSignals {
    set: libc::sigset_t,
}

/// Which signals [`StopSignals`] takes.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

impl StopSignals {
    /// Blocks the stop signals in the calling thread. Call it before any other thread exists,
    /// so that no thread can take them with their default action (death).
    pub fn block() -> std::io::Result<StopSignals> {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; the calls only
        // modify `set` and this thread's signal mask.
        let (set, rc) = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for signal in STOP_SIGNALS {
                libc::sigaddset(&mut set, signal);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            (set, rc)
        };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(StopSignals { set })
    }

    /// Starts a thread that takes the first stop signal with `sigwait` and calls `on_signal`
    /// with it.
    pub fn watch(
        self,
        on_signal: impl FnOnce(libc::c_int) + Send + 'static,
    ) -> std::io::Result<()> {
        let set = self.set;
        std::thread::Builder::new()
            .name("cocoon-signals".into())
            .spawn(move || {
                let mut signal: libc::c_int = 0;
                // SAFETY: `set` was initialised by `block` and copied into this thread;
                // `signal` is ours.
                if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                    on_signal(signal);
                }
            })
            .map(drop)
    }
}
