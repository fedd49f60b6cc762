//! PID 1's duty to reap: one thread collects every child's exit (SIGCHLD is blocked in all
//! threads and taken with sigwait), and callers wait for the pids they care about. Exits of pids
//! nobody registered yet are kept for a while, because a process can exit before whoever
//! started it has learned its pid. A caller that only needs to hear of an exit registers a
//! callback ([`Reaper::on_exit`]), which the reaping thread runs: no thread waits per process.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, OnceLock};

/// How a process ended, from waitpid's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    Exited(i32),
    Signaled(i32),
}

/// Exits nobody has asked for yet, oldest first; orphans re-parented to PID 1 end up here
/// and are forgotten once there are more than this many.
const UNCLAIMED_LIMIT: usize = 4096;

type OnExit = Box<dyn FnOnce(WaitStatus) + Send>;

#[derive(Default)]
struct Exits {
    by_pid: HashMap<i32, WaitStatus>,
    order: VecDeque<i32>,
    callbacks: HashMap<i32, OnExit>,
}

pub struct Reaper {
    exits: Mutex<Exits>,
    changed: Condvar,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

/// Blocks SIGCHLD in the calling thread. Call from `main` before any thread exists, so every
/// thread inherits the mask and only the reaper's sigwait sees the signal.
pub fn block_sigchld() {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t; pthread_sigmask only changes this thread's mask.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Starts the reaping thread (once) and returns the reaper.
pub fn reaper() -> &'static Reaper {
    REAPER.get_or_init(|| {
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(reap_forever)
            .expect("the agent cannot run without its reaper thread");
        Reaper {
            exits: Mutex::new(Exits::default()),
            changed: Condvar::new(),
        }
    })
}

fn reap_forever() {
    // SAFETY: as in block_sigchld.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
    }
    let reaper = reaper();
    loop {
        let mut signal = 0;
        // SAFETY: set and signal are valid for the call; SIGCHLD is blocked in every thread.
        unsafe { libc::sigwait(&set, &mut signal) };
        // Signals coalesce: one SIGCHLD may stand for many exits.
        loop {
            let mut status = 0;
            // SAFETY: status is a valid out-parameter.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            let exit = if libc::WIFSIGNALED(status) {
                WaitStatus::Signaled(libc::WTERMSIG(status))
            } else {
                WaitStatus::Exited(libc::WEXITSTATUS(status))
            };
            reaper.record(pid, exit);
        }
    }
}

impl Reaper {
    fn record(&self, pid: i32, exit: WaitStatus) {
        let mut exits = self.exits.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(callback) = exits.callbacks.remove(&pid) {
            drop(exits);
            callback(exit);
            return;
        }
        exits.by_pid.insert(pid, exit);
        exits.order.push_back(pid);
        while exits.order.len() > UNCLAIMED_LIMIT {
            if let Some(old) = exits.order.pop_front() {
                exits.by_pid.remove(&old);
            }
        }
        self.changed.notify_all();
    }

    /// Runs `callback` with the exit of `pid` (a child of the agent) once it has exited: now, if
    /// it already has. The callback runs on the reaping thread, so it must not block for long.
    /// Nobody may also [`wait`](Reaper::wait) for the same pid.
    pub fn on_exit(&self, pid: i32, callback: impl FnOnce(WaitStatus) + Send + 'static) {
        let mut exits = self.exits.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(exit) = exits.by_pid.remove(&pid) {
            exits.order.retain(|p| *p != pid);
            drop(exits);
            callback(exit);
            return;
        }
        exits.callbacks.insert(pid, Box::new(callback));
    }

    /// Blocks until `pid` (a child of the agent) has exited, and returns how.
    pub fn wait(&self, pid: i32) -> WaitStatus {
        let mut exits = self.exits.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(exit) = exits.by_pid.remove(&pid) {
                exits.order.retain(|p| *p != pid);
                return exit;
            }
            exits = self.changed.wait(exits).unwrap_or_else(|e| e.into_inner());
        }
    }
}
