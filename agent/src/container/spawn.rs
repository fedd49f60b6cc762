//! Starting a container process. The agent forks it directly: the process is the agent's
//! child, joins the container's cgroup and enters (or creates) its namespaces itself before
//! anything else. The pid namespace is the exception, since a process cannot move itself into
//! one: the forking thread switches the pid namespace its children get (a per-thread setting)
//! around the fork, so the process is born there, PID 1 of a new one. A new user (or time)
//! namespace has to exist before the pid namespace it owns, and a thread cannot make one: then a
//! short-lived helper is forked, makes the namespaces with clone(2) and CLONE_PARENT, reports
//! the pid and exits.
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
use std::sync::OnceLock;

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
        self.exec_result()
    }

    /// For a process that does not wait for start (an exec'd one): returns once it has exec'd,
    /// or with why it could not (the execve error, say), after which it exits with 127.
    pub fn exec_result(mut self) -> Result<(), AgentError> {
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

/// The signals the agent ignores (SIGPIPE, as Rust's runtime sets it up). exec resets caught
/// signals to their default but keeps ignored ones, so these are the ones a container process
/// must reset. Read once, in the agent: it sets its dispositions at startup only.
fn ignored_signals() -> &'static [libc::c_int] {
    static IGNORED: OnceLock<Vec<libc::c_int>> = OnceLock::new();
    IGNORED.get_or_init(|| {
        (1..32)
            .filter(|&signal| signal != libc::SIGKILL && signal != libc::SIGSTOP)
            .filter(|&signal| {
                // SAFETY: sigaction is plain data; with a null new action, sigaction(2) only
                // reads the current one into `old`.
                let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
                // SAFETY: as above; `old` is a valid out-parameter.
                let rc = unsafe { libc::sigaction(signal, std::ptr::null(), &mut old) };
                rc == 0 && old.sa_sigaction == libc::SIG_IGN
            })
            .collect()
    })
}

/// The agent blocks SIGCHLD and ignores SIGPIPE (Rust's runtime does); a container process
/// must start with neither, as it would from a shell. `ignored` comes from [`ignored_signals`],
/// read before the fork.
fn reset_signals(ignored: &[libc::c_int]) {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it. Restoring default
    // dispositions and an empty mask only affects this process.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        for &signal in ignored {
            libc::signal(signal, libc::SIG_DFL);
        }
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

/// The agent's own pid namespace, to return the forking thread to after a fork into another.
fn own_pid_namespace() -> Result<RawFd, AgentError> {
    static OWN: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = OWN.get() {
        return Ok(fd.as_raw_fd());
    }
    // The active pid namespace, which setns(2) always lets a thread return to.
    let file =
        File::open("/proc/self/ns/pid").map_err(|e| failed("open the agent's pid namespace", e))?;
    Ok(OWN.get_or_init(|| file.into()).as_raw_fd())
}

/// Points the calling thread's future children at a pid namespace: `Some(fd)` joins that one,
/// `None` makes a new one.
fn set_children_pid_namespace(join: Option<RawFd>) -> Result<(), AgentError> {
    let sys = LinuxSyscall;
    match join {
        Some(fd) => sys
            .setns(fd, libc::CLONE_NEWPID)
            .map_err(|e| failed("join the container's pid namespace", e)),
        None => sys
            .unshare(libc::CLONE_NEWPID)
            .map_err(|e| failed("create a pid namespace", e)),
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
    let gate = Gate {
        report: report_write.as_raw_fd(),
        start: start_read.as_raw_fd(),
        wait_for_start,
    };
    let ignored = ignored_signals();
    let needs_helper = matches!(&namespaces, Namespaces::New { clone_flags, .. }
        if clone_flags & (libc::CLONE_NEWUSER | CLONE_NEWTIME) != 0);
    let child = Child {
        namespaces: &namespaces,
        cgroup_procs,
        stdio: &stdio,
        gate: &gate,
        ignored,
    };
    let forked = if needs_helper {
        fork_helper(&child, body).map(Forked::Helper)
    } else {
        fork_direct(&child, body).map(Forked::Process)
    };
    // The child's ends: with them closed here, a child that dies without a word is EOF.
    drop((report_write, start_read, stdio));
    let pid = match forked? {
        Forked::Process(pid) => pid,
        Forked::Helper(helper) => helper_report(helper, &mut report_read)?,
    };
    let abandon = |error: AgentError| {
        // SAFETY: kill a child we created; reaping follows.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        reaper().wait(pid);
        error
    };
    if let Namespaces::New {
        clone_flags,
        id_maps: Some((uid_map, gid_map)),
    } = &namespaces
        && clone_flags & libc::CLONE_NEWUSER != 0
    {
        let write = |file: &str, map: &str| {
            std::fs::write(format!("/proc/{pid}/{file}"), map)
                .map_err(|e| failed(&format!("write {file}"), e))
        };
        if let Err(e) = write("uid_map", uid_map)
            .and_then(|()| write("gid_map", gid_map))
            .and_then(|()| {
                start_write
                    .write_all(&[1])
                    .map_err(|e| failed("signal id maps", e))
            })
        {
            return Err(abandon(e));
        }
    }
    drop(namespaces);
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

/// What a forked process is set up with before its body runs.
#[derive(Clone, Copy)]
struct Child<'a> {
    namespaces: &'a Namespaces,
    cgroup_procs: &'a Path,
    stdio: &'a ChildStdio,
    gate: &'a Gate,
    ignored: &'a [libc::c_int],
}

impl Child<'_> {
    /// In the forked process: closes every fd but its own, then joins the container's cgroup
    /// (first, so that everything from here on counts against the container's limits).
    fn enter(&self) -> Result<(), String> {
        let mut keep: Vec<RawFd> = vec![self.gate.report, self.gate.start];
        keep.extend(self.stdio.fds.iter().map(|fd| fd.as_raw_fd()));
        if let Namespaces::Join(fds) = self.namespaces {
            keep.extend(fds.iter().map(|(fd, _)| fd.as_raw_fd()));
        }
        close_other_fds(&mut keep);
        std::fs::write(self.cgroup_procs, "0")
            .map_err(|e| format!("join cgroup {}: {e}", self.cgroup_procs.display()))
    }
}

/// What the agent forked: the process itself, or the helper that will report its pid.
enum Forked {
    Process(i32),
    Helper(i32),
}

/// CLONE_NEWTIME, which the libc crate does not name.
const CLONE_NEWTIME: libc::c_int = 0x80;

/// Forks the process itself; returns its pid.
fn fork_direct(
    child: &Child,
    body: impl FnOnce(&Gate) -> Result<Infallible, String>,
) -> Result<i32, AgentError> {
    let namespaces = child.namespaces;
    let pid_namespace = match namespaces {
        Namespaces::New { clone_flags, .. } if clone_flags & libc::CLONE_NEWPID != 0 => Some(None),
        Namespaces::New { .. } => None,
        Namespaces::Join(fds) => fds
            .iter()
            .find(|(_, kind)| *kind == libc::CLONE_NEWPID)
            .map(|(fd, _)| Some(fd.as_raw_fd())),
    };
    let own = match pid_namespace {
        Some(join) => {
            // Opened before the switch, so that the way back is known to be open.
            let own = own_pid_namespace()?;
            set_children_pid_namespace(join)?;
            Some(own)
        }
        None => None,
    };
    // SAFETY: fork in a threaded process: glibc keeps malloc usable in the child, and the child
    // touches no lock another thread could hold (no stdout, no env); it ends in exec or _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        child_main(child, body);
    }
    let fork_error = std::io::Error::last_os_error();
    if let Some(own) = own {
        // Back to the agent's own before anything else: while the thread's children would be
        // born elsewhere, it cannot even start a thread (clone refuses CLONE_THREAD then).
        if let Err(e) = LinuxSyscall.setns(own, libc::CLONE_NEWPID) {
            crate::console::line(&format!(
                "cocoon-agent: cannot return a thread to the agent's pid namespace: {e}"
            ));
        }
    }
    if pid < 0 {
        return Err(failed("fork", fork_error));
    }
    Ok(pid)
}

/// The forked process up to `body`: stdio and fds, cgroup, namespaces but the pid one (which it
/// was born in). Never returns.
fn child_main(child: &Child, body: impl FnOnce(&Gate) -> Result<Infallible, String>) -> ! {
    let Child {
        namespaces,
        stdio,
        gate,
        ignored,
        ..
    } = *child;
    let fail = |message: String| -> ! {
        report(gate.report, &Report::Failed(message));
        // SAFETY: end the process without unwinding into the agent's code.
        unsafe { libc::_exit(1) }
    };
    if let Err(message) = child.enter() {
        fail(message);
    }
    match namespaces {
        Namespaces::New { clone_flags, .. } => {
            let flags = clone_flags & !libc::CLONE_NEWPID;
            if flags != 0
                && let Err(e) = LinuxSyscall.unshare(flags)
            {
                fail(format!("create namespaces {flags:#x}: {e}"));
            }
        }
        Namespaces::Join(fds) => {
            if let Err(message) = join_namespaces(fds, libc::CLONE_NEWPID) {
                fail(message);
            }
        }
    }
    let code = become_container_process(stdio, gate, ignored, body);
    // SAFETY: end the process without unwinding into the agent's code.
    unsafe { libc::_exit(code) }
}

/// setns into `fds` but the `skip` kind, the user namespace first: the others may belong to it.
fn join_namespaces(fds: &[(OwnedFd, libc::c_int)], skip: libc::c_int) -> Result<(), String> {
    let mut ordered: Vec<&(OwnedFd, libc::c_int)> =
        fds.iter().filter(|(_, kind)| *kind != skip).collect();
    ordered.sort_by_key(|(_, kind)| *kind != libc::CLONE_NEWUSER);
    for (fd, kind) in ordered {
        LinuxSyscall
            .setns(fd.as_raw_fd(), *kind)
            .map_err(|e| format!("join namespace {kind:#x}: {e}"))?;
    }
    Ok(())
}

/// Signals, session and stdio of a container process, then `body`. Returns the exit code when
/// `body` could not exec.
fn become_container_process(
    stdio: &ChildStdio,
    gate: &Gate,
    ignored: &[libc::c_int],
    body: impl FnOnce(&Gate) -> Result<Infallible, String>,
) -> i32 {
    reset_signals(ignored);
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

/// Forks the helper that clones the process; returns the helper's pid.
fn fork_helper(
    child: &Child,
    body: impl FnOnce(&Gate) -> Result<Infallible, String>,
) -> Result<i32, AgentError> {
    // SAFETY: fork in a threaded process: glibc keeps malloc usable in the child, and the child
    // touches no lock another thread could hold (no stdout, no env); it ends in _exit.
    let helper = unsafe { libc::fork() };
    if helper < 0 {
        return Err(failed("fork", std::io::Error::last_os_error()));
    }
    if helper == 0 {
        let code = helper_main(child, body);
        // SAFETY: end the helper without unwinding into the agent's code.
        unsafe { libc::_exit(code) };
    }
    Ok(helper)
}

/// The pid the helper reports, once the helper is reaped.
fn helper_report(helper: i32, report_read: &mut File) -> Result<i32, AgentError> {
    let first = read_frame::<_, Report>(report_read);
    reaper().wait(helper);
    match first {
        Ok(Report::Pid(pid)) => Ok(pid),
        Ok(Report::Failed(message)) => Err(AgentError::new(ErrorKind::Failed, message)),
        Ok(other) => Err(failed("spawn", format!("unexpected report {other:?}"))),
        Err(e) => Err(failed("spawn helper", e)),
    }
}

/// The helper: cgroup, clone with the new namespaces. Returns its exit code.
fn helper_main(child: &Child, body: impl FnOnce(&Gate) -> Result<Infallible, String>) -> i32 {
    let gate = child.gate;
    let fail = |message: String| {
        report(gate.report, &Report::Failed(message));
        1
    };
    // Joined before the clone, so the process is born in the cgroup (and its pids limit).
    if let Err(message) = child.enter() {
        return fail(message);
    }
    let clone_flags = match child.namespaces {
        Namespaces::New { clone_flags, .. } => *clone_flags,
        Namespaces::Join(_) => 0,
    };
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
    become_container_process(child.stdio, gate, child.ignored, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn null_stdio() -> ChildStdio {
        let null = || OwnedFd::from(File::options().write(true).open("/dev/null").unwrap());
        ChildStdio {
            fds: [null(), null(), null()],
            console: None,
        }
    }

    /// Spawns `body` as an exec'd process would be (no namespaces, no start gate); returns
    /// what `exec_result` said and the process's exit status.
    fn exec_like(
        body: impl FnOnce(&Gate) -> Result<Infallible, String>,
    ) -> (Result<(), AgentError>, i32) {
        let procs = std::env::temp_dir().join(format!(
            "cocoon-spawn-procs-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&procs, "").unwrap();
        let namespaces = Namespaces::New {
            clone_flags: 0,
            id_maps: None,
        };
        let spawned = spawn(namespaces, &procs, null_stdio(), false, body).unwrap();
        let pid = spawned.pid;
        let result = spawned.exec_result();
        let mut status = 0;
        // SAFETY: waitpid on our own child, with a valid out-parameter.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let _ = std::fs::remove_file(&procs);
        (result, status)
    }

    #[test]
    fn an_exec_that_fails_after_ready_reports_why() {
        let (result, status) = exec_like(|gate| {
            gate.ready();
            Err("exec /tmp/bad: no such file or directory".into())
        });
        let error = result.unwrap_err();
        assert_eq!(error.message, "exec /tmp/bad: no such file or directory");
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 127);
    }

    #[test]
    fn an_exec_that_succeeds_is_ok() {
        let (result, status) = exec_like(|gate| {
            gate.ready();
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            // SAFETY: a NUL-terminated path and a NULL-terminated argv that outlive the call.
            unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
            Err(format!(
                "exec /bin/true: {}",
                std::io::Error::last_os_error()
            ))
        });
        result.unwrap();
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }
}
