//! Starting a container process: the agent forks a short-lived helper, which joins the cgroup
//! (and, for exec, the container's namespaces) and clones the real process with CLONE_PARENT,
//! so the process is the agent's child, born in the cgroup and, with CLONE_NEWPID, PID 1 of
//! its namespace. The helper reports the pid and exits.
//!
//! The process reports back on a pipe: `Ready` once its setup is done, or `Failed` with a
//! message. It then waits on a second pipe for `start` (runc's create/start split) and execs;
//! the report pipe is close-on-exec, so EOF there means exec succeeded.

use std::convert::Infallible;
use std::fs::File;
use std::io::{Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use serde::{Deserialize, Serialize};

use cocoon_agent_protocol::frame::{FrameError, read_frame, write_frame};
use cocoon_agent_protocol::message::{AgentError, ErrorKind};

use super::syscall::{LinuxSyscall, Syscall};
use crate::reaper::reaper;
use crate::stdio::ChildStdio;

#[derive(Debug, Serialize, Deserialize)]
enum Report {
    Pid(i32),
    Ready,
    Failed(String),
}

/// Which namespaces the process gets.
pub enum Namespaces {
    /// New ones (CLONE_NEW* flags), with the uid and gid maps to write when a user namespace
    /// is among them.
    New {
        clone_flags: libc::c_int,
        id_maps: Option<(String, String)>,
    },
    /// A running container's, as namespace fds with their CLONE_NEW* type.
    Join(Vec<(OwnedFd, libc::c_int)>),
}

/// The process side's handle on its parent: report readiness, wait for start.
pub struct Gate {
    report: RawFd,
    start: RawFd,
    wait_for_start: bool,
}

impl Gate {
    /// Waits for the parent's next go-ahead byte; EOF means the parent gave up.
    fn wait(&self) {
        let mut byte = [0u8; 1];
        // SAFETY: ManuallyDrop: the fd stays open; we only borrow it as a File.
        let mut start = ManuallyDrop::new(unsafe { File::from_raw_fd(self.start) });
        if !matches!(start.read(&mut byte), Ok(1)) {
            // SAFETY: _exit ends this process without running the parent's atexit handlers.
            unsafe { libc::_exit(1) };
        }
    }

    /// Waits until the parent has written the user namespace's id maps.
    pub fn wait_for_id_maps(&self) {
        self.wait();
    }

    /// Tells the parent setup is done, then (for a container's init) waits for start.
    pub fn ready(&self) {
        report(self.report, &Report::Ready);
        if self.wait_for_start {
            self.wait();
        }
    }
}

fn report(fd: RawFd, message: &Report) {
    // SAFETY: ManuallyDrop: the fd stays open; we only borrow it as a File.
    let mut file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    let _ = write_frame(&mut *file, message);
}

fn pipe() -> Result<(File, File), AgentError> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid out-array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(failed("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 returned two new fds that nothing else owns.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

fn failed(what: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::new(ErrorKind::Failed, format!("{what}: {e}"))
}

/// A process that exists and has finished its setup.
pub struct Spawned {
    pub pid: i32,
    report: File,
    start: File,
}

impl Spawned {
    /// Lets the process exec, and returns once it has (or has failed to).
    pub fn start(mut self) -> Result<(), AgentError> {
        self.start
            .write_all(&[1])
            .map_err(|e| failed("signal the container to start", e))?;
        match read_frame::<_, Report>(&mut self.report) {
            Err(FrameError::Closed) => Ok(()),
            Ok(Report::Failed(message)) => Err(AgentError::new(ErrorKind::Failed, message)),
            Ok(other) => Err(failed(
                "container start",
                format!("unexpected report {other:?}"),
            )),
            Err(e) => Err(failed("container start", e)),
        }
    }
}

/// Closes every fd of this process except `keep` (and 0-2).
fn close_other_fds(keep: &mut [RawFd]) {
    keep.sort_unstable();
    let mut next = 3u32;
    for &fd in keep.iter() {
        let fd = fd as u32;
        if fd > next {
            // SAFETY: close_range only closes fds; this process owns no Rust object that
            // will use the closed ones (it ends in exec or _exit).
            unsafe { libc::syscall(libc::SYS_close_range, next, fd - 1, 0) };
        }
        next = next.max(fd + 1);
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, next, u32::MAX, 0) };
}

/// Puts `fds` on 0, 1 and 2 and makes a pty slave the controlling terminal.
fn install_stdio(stdio: &ChildStdio) -> Result<(), String> {
    for (target, fd) in stdio.fds.iter().enumerate() {
        // SAFETY: dup2 onto the standard fds of this (child) process.
        if unsafe { libc::dup2(fd.as_raw_fd(), target as RawFd) } < 0 {
            return Err(format!("dup2 stdio: {}", std::io::Error::last_os_error()));
        }
    }
    if stdio.console.is_some() {
        // SAFETY: fd 0 is the pty slave; this process just became a session leader.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return Err(format!(
                "set the controlling terminal: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// The agent blocks SIGCHLD and ignores SIGPIPE (Rust's runtime does); a container process
/// must start with neither, as it would from a shell.
fn reset_signals() {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it. Restoring default
    // dispositions and an empty mask only affects this process.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        for signal in 1..32 {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

/// Starts a process. `body` runs in it: it sets the process up, calls [`Gate::ready`] and
/// execs, or returns the reason it could not.
pub fn spawn(
    namespaces: Namespaces,
    cgroup_procs: &Path,
    stdio: ChildStdio,
    wait_for_start: bool,
    body: impl FnOnce(&Gate) -> Result<Infallible, String>,
) -> Result<Spawned, AgentError> {
    let (mut report_read, report_write) = pipe()?;
    let (start_read, mut start_write) = pipe()?;

    // SAFETY: fork in a threaded process: glibc keeps malloc usable in the child, and the child
    // touches no lock another thread could hold (no stdout, no env); it ends in _exit.
    let helper = unsafe { libc::fork() };
    if helper < 0 {
        return Err(failed("fork", std::io::Error::last_os_error()));
    }
    if helper == 0 {
        let gate = Gate {
            report: report_write.as_raw_fd(),
            start: start_read.as_raw_fd(),
            wait_for_start,
        };
        let code = helper_main(&namespaces, cgroup_procs, &stdio, &gate, body);
        // SAFETY: end the helper without unwinding into the agent's code.
        unsafe { libc::_exit(code) };
    }
    drop((report_write, start_read, stdio));
    let (flags_have_user, id_maps) = match &namespaces {
        Namespaces::New {
            clone_flags,
            id_maps,
        } => (clone_flags & libc::CLONE_NEWUSER != 0, id_maps.clone()),
        Namespaces::Join(_) => (false, None),
    };
    drop(namespaces);

    let first = read_frame::<_, Report>(&mut report_read);
    reaper().wait(helper);
    let pid = match first {
        Ok(Report::Pid(pid)) => pid,
        Ok(Report::Failed(message)) => return Err(AgentError::new(ErrorKind::Failed, message)),
        Ok(other) => return Err(failed("spawn", format!("unexpected report {other:?}"))),
        Err(e) => return Err(failed("spawn helper", e)),
    };
    let abandon = |error: AgentError| {
        // SAFETY: kill a child we created; reaping follows.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        reaper().wait(pid);
        error
    };
    if flags_have_user && let Some((uid_map, gid_map)) = id_maps {
        let write = |file: &str, map: &str| {
            std::fs::write(format!("/proc/{pid}/{file}"), map)
                .map_err(|e| failed(&format!("write {file}"), e))
        };
        if let Err(e) = write("uid_map", &uid_map)
            .and_then(|()| write("gid_map", &gid_map))
            .and_then(|()| {
                start_write
                    .write_all(&[1])
                    .map_err(|e| failed("signal id maps", e))
            })
        {
            return Err(abandon(e));
        }
    }
    match read_frame::<_, Report>(&mut report_read) {
        Ok(Report::Ready) => Ok(Spawned {
            pid,
            report: report_read,
            start: start_write,
        }),
        Ok(Report::Failed(message)) => Err(abandon(AgentError::new(ErrorKind::Failed, message))),
        Ok(other) => Err(abandon(failed(
            "spawn",
            format!("unexpected report {other:?}"),
        ))),
        // exec succeeded without a Ready: only a body that never calls ready() does that.
        Err(FrameError::Closed) => Err(abandon(failed("spawn", "the process exited during setup"))),
        Err(e) => Err(abandon(failed("spawn", e))),
    }
}

/// The helper: cgroup, namespaces, clone. Returns its exit code.
fn helper_main(
    namespaces: &Namespaces,
    cgroup_procs: &Path,
    stdio: &ChildStdio,
    gate: &Gate,
    body: impl FnOnce(&Gate) -> Result<Infallible, String>,
) -> i32 {
    let mut keep: Vec<RawFd> = vec![gate.report, gate.start];
    keep.extend(stdio.fds.iter().map(|fd| fd.as_raw_fd()));
    if let Namespaces::Join(fds) = namespaces {
        keep.extend(fds.iter().map(|(fd, _)| fd.as_raw_fd()));
    }
    close_other_fds(&mut keep);

    let fail = |message: String| {
        report(gate.report, &Report::Failed(message));
        1
    };
    // Joined before the clone, so the process is born in the cgroup (and its pids limit).
    if let Err(e) = std::fs::write(cgroup_procs, "0") {
        return fail(format!("join cgroup {}: {e}", cgroup_procs.display()));
    }
    let mut clone_flags = 0;
    match namespaces {
        Namespaces::New {
            clone_flags: flags, ..
        } => clone_flags = *flags,
        Namespaces::Join(fds) => {
            // The user namespace first: the others may belong to it.
            let mut ordered: Vec<&(OwnedFd, libc::c_int)> = fds.iter().collect();
            ordered.sort_by_key(|(_, kind)| *kind != libc::CLONE_NEWUSER);
            for (fd, kind) in ordered {
                if let Err(e) = LinuxSyscall.setns(fd.as_raw_fd(), *kind) {
                    return fail(format!("join namespace {kind:#x}: {e}"));
                }
            }
        }
    }
    let flags = (clone_flags | libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: a fork-like clone (no new stack, no shared memory) from a single-threaded
    // process; the child continues below on its own copy of everything.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if pid < 0 {
        return fail(format!("clone: {}", std::io::Error::last_os_error()));
    }
    if pid > 0 {
        report(gate.report, &Report::Pid(pid as i32));
        return 0;
    }
    reset_signals();
    // SAFETY: setsid in the new process, which is not a group leader.
    unsafe { libc::setsid() };
    let message = match install_stdio(stdio) {
        Err(message) => message,
        Ok(()) => match body(gate) {
            Err(message) => message,
            Ok(never) => match never {},
        },
    };
    report(gate.report, &Report::Failed(message));
    127
}
