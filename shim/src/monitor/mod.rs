//! The processes that stand in for a container's processes on the host, as engines expect
//! of runc: the container's monitor (`container.rs`), which runs the microVM in its own threads
//! and stands for the container's init, and exec monitors (`exec.rs`), one per exec'd process.
//! Each holds its process's stdio (or terminal) and relays it to the guest (`stdio.rs`),
//! forwards the signals it receives, and exits as its process did: with its code, or killed by
//! the same signal.

pub mod container;
pub mod exec;
pub mod stdio;

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use cocoon_agent_protocol::client::AgentClient;
use cocoon_agent_protocol::message::ExitStatus;

use crate::console;
use stdio::Stdio;

/// The fd on which a monitor started by `create` or `exec --detach` reports back.
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

/// Tells the verb that started us how it went. Without a report fd (the verb runs the monitor
/// in its own process), failure is printed and `cleanup` runs.
fn report(report: &mut Option<File>, result: &Result<(), String>, cleanup: impl FnOnce()) {
    match (report.take(), result) {
        (Some(mut file), Ok(())) => {
            let _ = writeln!(
                file,
                "{}",
                serde_json::to_string(&Report::Created).unwrap_or_default()
            );
        }
        (Some(mut file), Err(message)) => {
            let _ = writeln!(
                file,
                "{}",
                serde_json::to_string(&Report::Failed(message.clone())).unwrap_or_default()
            );
        }
        (None, Err(message)) => {
            tracing::error!("{message}");
            cleanup();
        }
        (None, Ok(())) => {}
    }
}

/// The process a monitor stands for: the container's init (`exec_id` None) or an exec.
pub struct Target {
    pub uds: PathBuf,
    pub id: String,
    pub exec_id: Option<String>,
}

impl Target {
    fn client(&self) -> Result<AgentClient, String> {
        AgentClient::connect(&self.uds).map_err(|e| e.to_string())
    }
}

/// Forwards signals until the process exits (or the VM ends: `vm_ended`), and returns its
/// status once its output has arrived.
fn wait_and_forward(
    target: Target,
    stdio: Stdio,
    vm_ended: Option<&mpsc::Receiver<String>>,
    set: libc::sigset_t,
) -> ExitStatus {
    let (tx, rx) = mpsc::channel();
    let (uds, id, exec_id) = (
        target.uds.clone(),
        target.id.clone(),
        target.exec_id.clone(),
    );
    std::thread::spawn(move || {
        let status = AgentClient::connect(&uds).and_then(|mut c| c.wait(&id, exec_id.as_deref()));
        let _ = tx.send(status.map_err(|e| e.to_string()));
    });
    let slave = stdio
        .pty_slave
        .as_ref()
        .map(std::os::fd::AsRawFd::as_raw_fd);
    std::thread::spawn(move || forward_signals(&target, slave, set));
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
        if let Some(Ok(reason)) = vm_ended.map(|rx| rx.try_recv()) {
            tracing::error!("the microVM ended before the container: {reason}");
            break killed;
        }
    };
    stdio.drain();
    status
}

fn forward_signals(target: &Target, pty_slave: Option<RawFd>, set: libc::sigset_t) {
    loop {
        let mut signal = 0;
        // SAFETY: set is initialised and blocked in every thread.
        if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
            continue;
        }
        let Ok(mut client) = target.client() else {
            continue;
        };
        let exec_id = target.exec_id.as_deref();
        let result = if signal == libc::SIGWINCH {
            match pty_slave.and_then(console::window_size) {
                Some((rows, cols)) => client.resize_terminal(&target.id, exec_id, rows, cols),
                None => Ok(()),
            }
        } else {
            client.signal(&target.id, exec_id, signal, false)
        };
        if let Err(e) = result {
            tracing::warn!("cannot pass signal {signal} to the container: {e}");
        }
    }
}

/// Exits as the process did: with its code, or killed by its signal.
fn exit_like(status: ExitStatus) -> ! {
    if let Some(signal) = status.signal {
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

/// The report fd our parent verb passed, if it started us.
pub fn report_file() -> Option<File> {
    std::env::var_os("COCOON_REPORT_FD")?;
    // SAFETY: F_GETFD only asks whether the fd is open.
    if unsafe { libc::fcntl(REPORT_FD, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the parent verb passed this fd to us for this purpose; we own it from here.
    Some(unsafe { File::from_raw_fd(REPORT_FD) })
}

/// Reads a monitor's report: `Ok` once its process exists.
pub fn read_report(report: File) -> Result<(), String> {
    let mut line = String::new();
    let mut reader = std::io::BufReader::new(report);
    let _ = std::io::BufRead::read_line(&mut reader, &mut line);
    match serde_json::from_str::<Report>(line.trim()) {
        Ok(Report::Created) => Ok(()),
        Ok(Report::Failed(message)) => Err(message),
        Err(_) => Err("the monitor exited before the process was created".into()),
    }
}

/// Writes `status` to `path` for `state` and `delete` to find.
fn record_exit(path: &Path, status: &ExitStatus) {
    let _ = crate::state::write_atomically(path, &serde_json::to_vec(status).unwrap_or_default());
}
