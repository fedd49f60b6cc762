//! The processes that stand in for a container's processes on the host, as engines expect
//! of runc: the container's monitor (`container.rs`), which runs the microVM in its own threads
//! and stands for the container's init, and exec monitors (`exec.rs`), one per exec'd process.
//! Each holds its process's stdio (or terminal) and relays it to the guest (`stdio.rs`),
//! forwards the signals it receives, and exits as its process did: with its code, or killed by
//! the same signal.

pub mod container;
pub mod exec;

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use cocoon_agent_protocol::message::ExitStatus;
use cocoon_runtime::{Container, Sandbox};

use crate::console;
use crate::error::CliError;
use crate::stdio::Stdio;

/// The fd on which a monitor started by `create` or `exec --detach` reports back (one end of
/// a socket pair: the verb's confirmation comes back on it).
pub const REPORT_FD: RawFd = 3;

/// A monitor's one message to the verb that started it: the process exists, or why not.
#[derive(Debug, Serialize, Deserialize)]
pub enum Report {
    Created,
    Failed(String),
}

/// Signals a monitor passes on to its process. The synchronous ones (SEGV, ...) and those that
/// mean something to the monitor itself are left alone.
const FORWARDED: [i32; 12] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGTERM,
    libc::SIGALRM,
    libc::SIGCONT,
    libc::SIGTSTP,
    libc::SIGPWR,
    libc::SIGWINCH,
    libc::SIGURG,
];

/// Blocks the forwarded signals in the calling thread and returns their set. Call before any
/// thread exists, so every thread inherits the mask and only `sigwait` sees them.
fn block_forwarded_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it, and
    // pthread_sigmask only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in FORWARDED {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// The byte a verb sends its monitor once the engine can know of it (see [`report`]).
pub const CONFIRM: u8 = b'!';

/// Tells the verb that started us how it went. Without a report channel (the verb runs the
/// monitor in its own process), failure is printed and `cleanup` runs. Returns whether to go
/// on: after `Created`, only once the verb has confirmed.
///
/// Until the verb has recorded us (state, pid file), nobody else knows this process: if the
/// verb dies first, whatever we run would be an orphan. So we die with it while booting
/// (`PR_SET_PDEATHSIG`, armed before exec) and, after our report, wait for its [`CONFIRM`]; EOF
/// instead means it died or gave up, and we must not go on.
fn report<T>(
    report: &mut Option<UnixStream>,
    result: &Result<T, CliError>,
    cleanup: impl FnOnce(),
) -> bool {
    match (report.take(), result) {
        (Some(mut channel), Ok(_)) => {
            // Disarmed before the report: once the verb has it, it may confirm and exit at
            // once, and must not take us with it. From here the channel tells if it dies.
            // SAFETY: prctl with integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0) };
            let line = serde_json::to_string(&Report::Created).unwrap_or_default();
            if writeln!(channel, "{line}").is_err() {
                tracing::error!("the verb that started this monitor is gone");
                return false;
            }
            let confirmed = confirmation(&mut channel);
            if !confirmed {
                tracing::error!("the verb that started this monitor ended before confirming it");
            }
            confirmed
        }
        (Some(mut channel), Err(e)) => {
            let _ = writeln!(
                channel,
                "{}",
                serde_json::to_string(&Report::Failed(e.to_string())).unwrap_or_default()
            );
            false
        }
        (None, Err(e)) => {
            tracing::error!("{e}");
            cleanup();
            false
        }
        (None, Ok(_)) => true,
    }
}

fn confirmation(channel: &mut UnixStream) -> bool {
    let mut byte = [0u8; 1];
    loop {
        match channel.read(&mut byte) {
            Ok(1) => return byte[0] == CONFIRM,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            _ => return false,
        }
    }
}

/// The process a monitor stands for: the container's init (`exec_id` None) or an exec.
pub struct Target {
    pub container: Container,
    pub exec_id: Option<String>,
}

/// Where the signals a monitor receives go. The container's monitor routes them through its
/// sandbox, which holds them while the VM is paused; an exec monitor sends them straight on.
pub trait SignalSink: Send + 'static {
    fn signal(&self, target: &Target, signal: i32);
}

/// Sends signals to the agent as they come.
pub struct Direct;

impl SignalSink for Direct {
    fn signal(&self, target: &Target, signal: i32) {
        if let Err(e) = target
            .container
            .signal(target.exec_id.as_deref(), signal, false)
        {
            tracing::warn!("cannot pass signal {signal} to the container: {e}");
        }
    }
}

/// Forwards signals until the process exits (or the VM ends: `sandbox`), and returns its
/// status once its output has arrived.
fn wait_and_forward(
    target: Target,
    stdio: Stdio,
    sandbox: Option<&Sandbox>,
    sink: impl SignalSink,
    set: libc::sigset_t,
) -> ExitStatus {
    let (tx, rx) = mpsc::channel();
    let (container, exec_id) = (target.container.clone(), target.exec_id.clone());
    std::thread::spawn(move || {
        let _ = tx.send(container.wait(exec_id.as_deref()));
    });
    let slave = stdio
        .pty_slave
        .as_ref()
        .map(std::os::fd::AsRawFd::as_raw_fd);
    std::thread::spawn(move || forward_signals(&target, slave, sink, set));
    let killed = ExitStatus {
        code: None,
        signal: Some(libc::SIGKILL),
        oom_killed: false,
    };
    let status = loop {
        if let Ok(result) = rx.recv_timeout(Duration::from_millis(200)) {
            break result.unwrap_or_else(|e| {
                tracing::error!("lost the guest agent: {e}");
                killed
            });
        }
        if let Some(reason) = sandbox.and_then(Sandbox::ended) {
            tracing::error!("the microVM ended before the container: {reason}");
            break killed;
        }
    };
    stdio.drain();
    status
}

fn forward_signals(
    target: &Target,
    pty_slave: Option<RawFd>,
    sink: impl SignalSink,
    set: libc::sigset_t,
) {
    loop {
        let mut signal = 0;
        // SAFETY: set is initialised and blocked in every thread.
        if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
            continue;
        }
        if signal == libc::SIGWINCH {
            if let Some((rows, cols)) = pty_slave.and_then(console::window_size)
                && let Err(e) =
                    target
                        .container
                        .resize_terminal(target.exec_id.as_deref(), rows, cols)
            {
                tracing::warn!("cannot resize the container's terminal: {e}");
            }
        } else {
            sink.signal(target, signal);
        }
    }
}

/// Signals whose default action stops a process: one the guest reports is never raised here,
/// since the monitor would stop and its engine wait for ever.
const STOPPING: [i32; 4] = [libc::SIGSTOP, libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU];
/// Signals whose default action dumps core: raised without a dump (the monitor's memory is the
/// host's, not the guest's to have written to disk).
const CORE_DUMPING: [i32; 10] = [
    libc::SIGQUIT,
    libc::SIGILL,
    libc::SIGTRAP,
    libc::SIGABRT,
    libc::SIGBUS,
    libc::SIGFPE,
    libc::SIGSEGV,
    libc::SIGXCPU,
    libc::SIGXFSZ,
    libc::SIGSYS,
];

/// Exits as the process did: with its code, or killed by its signal. The status comes from the
/// guest: a signal the monitor must not take is reported the way a shell does, 128 + signal.
fn exit_like(status: ExitStatus) -> ! {
    if let Some(signal) = status.signal {
        if !(1..=64).contains(&signal) {
            std::process::exit(255);
        }
        if STOPPING.contains(&signal) {
            std::process::exit(128 + signal);
        }
        if CORE_DUMPING.contains(&signal) {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: setrlimit reads the rlimit we own; prctl takes no pointers.
            unsafe {
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
            }
        }
        // SAFETY: restore the default action and unblock the signal, then deliver it to ourselves.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), signal);
        }
        // A signal whose default is to continue or be ignored: exit the way a shell reports it.
        std::process::exit(128 + signal);
    }
    std::process::exit(status.code.unwrap_or(255))
}

/// The report channel our parent verb passed, if it started us.
pub fn report_channel() -> Option<UnixStream> {
    std::env::var_os("COCOON_REPORT_FD")?;
    // SAFETY: F_GETFD only asks whether the fd is open.
    if unsafe { libc::fcntl(REPORT_FD, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: F_SETFD sets the close-on-exec flag of the fd we checked, so nothing we start
    // (hooks, mkfs) holds the channel open after the verb has gone.
    if unsafe { libc::fcntl(REPORT_FD, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return None;
    }
    // SAFETY: the parent verb passed this fd to us for this purpose; we own it from here.
    Some(unsafe { UnixStream::from_raw_fd(REPORT_FD) })
}

/// Reads a monitor's report: `Ok` once its process exists, else the monitor's error.
pub fn read_report(report: &UnixStream) -> Result<(), CliError> {
    let mut line = String::new();
    let mut reader = std::io::BufReader::new(report);
    let _ = std::io::BufRead::read_line(&mut reader, &mut line);
    match serde_json::from_str::<Report>(line.trim()) {
        Ok(Report::Created) => Ok(()),
        Ok(Report::Failed(message)) => Err(CliError::Monitor(message)),
        Err(_) => Err(CliError::Monitor(
            "the monitor exited before the process was created".into(),
        )),
    }
}

/// Writes `status` to `path` for `state` and `delete` to find.
fn record_exit(path: &Path, status: &ExitStatus) {
    let _ = crate::state::write_atomically(path, &serde_json::to_vec(status).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How a child that ends with `exit_like(status)` looks to its parent (the engine).
    fn ended_like(status: ExitStatus) -> i32 {
        // SAFETY: the child only calls exit_like, which exits or kills itself.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            exit_like(status);
        }
        let mut wstatus = 0;
        // SAFETY: waits for the child we just forked; WUNTRACED reports a stop, too.
        let waited = unsafe { libc::waitpid(pid, &mut wstatus, libc::WUNTRACED) };
        assert_eq!(waited, pid);
        if libc::WIFSTOPPED(wstatus) {
            // SAFETY: ends the stopped child before the test fails.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: reaps it.
            unsafe { libc::waitpid(pid, &mut wstatus, 0) };
            panic!("the monitor stopped");
        }
        wstatus
    }

    fn killed_by(signal: i32) -> ExitStatus {
        ExitStatus {
            code: None,
            signal: Some(signal),
            oom_killed: false,
        }
    }

    #[test]
    fn a_guest_signal_ends_the_monitor_alike_but_never_stops_it_or_dumps_its_core() {
        let w = ended_like(killed_by(libc::SIGTERM));
        assert!(libc::WIFSIGNALED(w) && libc::WTERMSIG(w) == libc::SIGTERM);
        let w = ended_like(killed_by(libc::SIGSEGV));
        assert!(libc::WIFSIGNALED(w) && libc::WTERMSIG(w) == libc::SIGSEGV);
        assert!(!libc::WCOREDUMP(w), "no core of the monitor");
        let w = ended_like(killed_by(libc::SIGSTOP));
        assert!(libc::WIFEXITED(w) && libc::WEXITSTATUS(w) == 128 + libc::SIGSTOP);
        let w = ended_like(killed_by(libc::SIGTSTP));
        assert!(libc::WIFEXITED(w) && libc::WEXITSTATUS(w) == 128 + libc::SIGTSTP);
        let w = ended_like(killed_by(1000));
        assert!(libc::WIFEXITED(w) && libc::WEXITSTATUS(w) == 255);
        let w = ended_like(ExitStatus {
            code: Some(3),
            signal: None,
            oom_killed: false,
        });
        assert!(libc::WIFEXITED(w) && libc::WEXITSTATUS(w) == 3);
    }
}
