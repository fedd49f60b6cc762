//! The host side of the agent protocol: a blocking client over the VMM's hybrid vsock socket
//! (`CONNECT <port>\n`, answered by `OK <host port>\n`; see docs/vsock.md).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cocoon_vmm_abi::uds::{bind_unix, connect_unix, with_unix_path};

use oci_spec::runtime::LinuxResources;

use crate::frame::{FrameError, read_frame, write_frame};
use crate::message::{
    AgentError, AgentInfo, CONTROL_PORT, ContainerState, ContainerStats, CreateContainer,
    ExecProcess, ExitStatus, GuestCounters, GuestSetup, PROTOCOL_VERSION, Reply, ReplyEnvelope,
    Request, RequestEnvelope, STDIO_PORT, StdioAttach, StdioStream,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent through {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the VMM refused the connection to guest port {0} (is the agent listening?)")]
    Refused(u32),
    #[error("agent connection: {0}")]
    Frame(#[from] FrameError),
    #[error("agent: {0}")]
    Agent(#[from] AgentError),
    #[error("the agent answered request {sent} with reply {got}")]
    WrongId { sent: u64, got: u64 },
    #[error("the agent answered {request} with an unexpected {reply}")]
    UnexpectedReply {
        request: &'static str,
        reply: &'static str,
    },
    #[error("the agent answered {request} with {what}")]
    Invalid { request: &'static str, what: String },
    #[error("the guest agent did not answer: {0}")]
    NoProgress(String),
    #[error("waiting for the agent's reply: {0}")]
    Poll(std::io::Error),
}

/// Judges, while a reply is awaited, whether the guest may still give it: called about every
/// [`PATIENCE_SLICE`] with no reply yet; `Err(why)` gives up the call. Made afresh for each
/// call (see [`AgentClient::set_patience`]).
pub type Patience = Box<dyn FnMut() -> Result<(), String> + Send>;

/// How often a call with [`Patience`] asks it while no reply has come.
pub const PATIENCE_SLICE: Duration = Duration::from_millis(250);

/// The largest pid a Linux guest can give (`PID_MAX_LIMIT`).
const PID_MAX: i32 = 1 << 22;
/// The highest signal number (`SIGRTMAX` on Linux).
const SIGNAL_MAX: i32 = 64;

/// A guest pid as the agent reported it: the guest is not trusted to keep to the kernel's range.
fn checked_pid(request: &'static str, pid: i32) -> Result<i32, ClientError> {
    if (1..=PID_MAX).contains(&pid) {
        Ok(pid)
    } else {
        Err(ClientError::Invalid {
            request,
            what: format!("pid {pid}"),
        })
    }
}

/// An exit status as the agent reported it: an exit code (0-255) or a signal (1-64), one of
/// the two. The host acts on it (the monitor exits with it, or kills itself with the signal),
/// so nothing outside what a real process can end with passes.
fn checked_exit(status: ExitStatus) -> Result<ExitStatus, ClientError> {
    let valid = match (status.code, status.signal) {
        (Some(code), None) => (0..=255).contains(&code),
        (None, Some(signal)) => (1..=SIGNAL_MAX).contains(&signal),
        _ => false,
    };
    if valid {
        Ok(status)
    } else {
        Err(ClientError::Invalid {
            request: "wait",
            what: format!("exit code {:?} and signal {:?}", status.code, status.signal),
        })
    }
}

/// Opens a stream to guest `port` through the VMM's vsock socket at `uds`.
pub fn connect_guest_port(uds: &Path, port: u32) -> Result<UnixStream, ClientError> {
    connect_guest_port_within(uds, port, None)
}

/// As [`connect_guest_port`], with the guest's answer to the connection awaited at most
/// `limit` (the VMM holds a connection until the guest accepts or refuses it).
pub fn connect_guest_port_within(
    uds: &Path,
    port: u32,
    limit: Option<Duration>,
) -> Result<UnixStream, ClientError> {
    let connect_error = |source| ClientError::Connect {
        path: uds.to_owned(),
        source,
    };
    let mut stream = connect_unix(uds).map_err(connect_error)?;
    stream.set_read_timeout(limit).map_err(connect_error)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(connect_error)?;
    // Byte by byte: whatever follows the newline belongs to the caller.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err(ClientError::Refused(port)),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < 64 => line.push(byte[0]),
            Ok(_) => return Err(ClientError::Refused(port)),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(connect_error(e)),
        }
    }
    if line.starts_with(b"OK ") {
        stream.set_read_timeout(None).map_err(connect_error)?;
        Ok(stream)
    } else {
        Err(ClientError::Refused(port))
    }
}

/// Opens one stdio stream of a process. Returns once the agent has registered it, so a
/// following create or exec finds it.
pub fn attach_stdio(
    uds: &Path,
    container_id: &str,
    exec_id: Option<&str>,
    stream: StdioStream,
) -> Result<UnixStream, ClientError> {
    let mut conn = connect_guest_port(uds, STDIO_PORT)?;
    write_frame(
        &mut conn,
        &StdioAttach {
            version: PROTOCOL_VERSION,
            container_id: container_id.to_owned(),
            exec_id: exec_id.map(str::to_owned),
            stream,
        },
    )?;
    let ack: Result<(), AgentError> = read_frame(&mut conn)?;
    ack?;
    Ok(conn)
}

/// One control connection to the agent.
pub struct AgentClient {
    stream: UnixStream,
    next_id: u64,
    patience: Option<Patience>,
}

macro_rules! expect_reply {
    ($reply:expr, $request:literal, $pattern:pat => $value:expr) => {
        match $reply {
            $pattern => Ok($value),
            other => Err(ClientError::UnexpectedReply {
                request: $request,
                reply: other.name(),
            }),
        }
    };
}

impl Reply {
    fn name(&self) -> &'static str {
        match self {
            Reply::Hello(_) => "hello",
            Reply::Done => "done",
            Reply::Pid(_) => "pid",
            Reply::Exited(_) => "exited",
            Reply::State(_) => "state",
            Reply::Stats(_) => "stats",
            Reply::Processes(_) => "processes",
            Reply::Counters(_) => "counters",
        }
    }
}

impl AgentClient {
    pub fn connect(uds: &Path) -> Result<AgentClient, ClientError> {
        AgentClient::connect_within(uds, None)
    }

    /// A client whose connection the guest must accept within `limit`.
    pub fn connect_within(uds: &Path, limit: Option<Duration>) -> Result<AgentClient, ClientError> {
        Ok(AgentClient::over(connect_guest_port_within(
            uds,
            CONTROL_PORT,
            limit,
        )?))
    }

    /// A client on a stream already connected to the agent's control port (public for the
    /// fuzz target, which plays a hostile agent on a socket pair).
    pub fn over(stream: UnixStream) -> AgentClient {
        AgentClient {
            stream,
            next_id: 1,
            patience: None,
        }
    }

    /// The pid of the process that serves the VM's vsock socket (the VMM: the guest's
    /// progress is measured on its threads).
    pub fn vmm_pid(&self) -> Option<i32> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: SO_PEERCRED writes one ucred, of the size given, into `cred`.
        let got = unsafe {
            libc::getsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&raw mut cred).cast(),
                &mut len,
            )
        };
        (got == 0 && cred.pid > 0).then_some(cred.pid)
    }

    /// Waits up to `timeout` for the agent to accept connections (the VMM's socket appears
    /// before the guest has booted).
    pub fn connect_when_ready(uds: &Path, timeout: Duration) -> Result<AgentClient, ClientError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match AgentClient::connect(uds) {
                Ok(mut client) => {
                    client.hello()?;
                    return Ok(client);
                }
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Sends one request and returns its reply.
    pub fn call(&mut self, request: Request) -> Result<Reply, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(
            &mut self.stream,
            &RequestEnvelope {
                version: PROTOCOL_VERSION,
                id,
                request,
            },
        )?;
        self.await_reply()?;
        let reply: ReplyEnvelope = read_frame(&mut self.stream)?;
        if reply.id != id {
            return Err(ClientError::WrongId {
                sent: id,
                got: reply.id,
            });
        }
        Ok(reply.result?)
    }

    fn done(&mut self, request: Request) -> Result<(), ClientError> {
        let reply = self.call(request)?;
        expect_reply!(reply, "request", Reply::Done => ())
    }

    pub fn hello(&mut self) -> Result<AgentInfo, ClientError> {
        let reply = self.call(Request::Hello)?;
        expect_reply!(reply, "hello", Reply::Hello(info) => info)
    }

    pub fn setup_guest(&mut self, setup: GuestSetup) -> Result<(), ClientError> {
        self.done(Request::SetupGuest(setup))
    }

    /// Returns the guest pid of the container's (not yet exec'd) init process.
    pub fn create_container(&mut self, create: CreateContainer) -> Result<i32, ClientError> {
        let reply = self.call(Request::CreateContainer(create))?;
        let pid = expect_reply!(reply, "create_container", Reply::Pid(pid) => pid)?;
        checked_pid("create_container", pid)
    }

    pub fn start_container(&mut self, container_id: &str) -> Result<i32, ClientError> {
        let reply = self.call(Request::StartContainer {
            container_id: container_id.to_owned(),
        })?;
        let pid = expect_reply!(reply, "start_container", Reply::Pid(pid) => pid)?;
        checked_pid("start_container", pid)
    }

    pub fn exec_process(&mut self, exec: ExecProcess) -> Result<i32, ClientError> {
        let reply = self.call(Request::ExecProcess(exec))?;
        let pid = expect_reply!(reply, "exec_process", Reply::Pid(pid) => pid)?;
        checked_pid("exec_process", pid)
    }

    pub fn signal(
        &mut self,
        container_id: &str,
        exec_id: Option<&str>,
        signal: i32,
        all: bool,
    ) -> Result<(), ClientError> {
        self.done(Request::Signal {
            container_id: container_id.to_owned(),
            exec_id: exec_id.map(str::to_owned),
            signal,
            all,
        })
    }

    /// Blocks until the process exits. Use a connection of its own for this.
    pub fn wait(
        &mut self,
        container_id: &str,
        exec_id: Option<&str>,
    ) -> Result<ExitStatus, ClientError> {
        let reply = self.call(Request::Wait {
            container_id: container_id.to_owned(),
            exec_id: exec_id.map(str::to_owned),
        })?;
        let status = expect_reply!(reply, "wait", Reply::Exited(status) => status)?;
        checked_exit(status)
    }

    pub fn resize_terminal(
        &mut self,
        container_id: &str,
        exec_id: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<(), ClientError> {
        self.done(Request::ResizeTerminal {
            container_id: container_id.to_owned(),
            exec_id: exec_id.map(str::to_owned),
            rows,
            cols,
        })
    }

    pub fn state(&mut self, container_id: &str) -> Result<ContainerState, ClientError> {
        let reply = self.call(Request::State {
            container_id: container_id.to_owned(),
        })?;
        expect_reply!(reply, "state", Reply::State(state) => state)
    }

    pub fn counters(&mut self) -> Result<GuestCounters, ClientError> {
        let reply = self.call(Request::Counters)?;
        expect_reply!(reply, "counters", Reply::Counters(counters) => counters)
    }

    pub fn stats(&mut self, container_id: &str) -> Result<ContainerStats, ClientError> {
        let reply = self.call(Request::Stats {
            container_id: container_id.to_owned(),
        })?;
        expect_reply!(reply, "stats", Reply::Stats(stats) => stats)
    }

    /// Writes new limits to the container's cgroup.
    pub fn update_resources(
        &mut self,
        container_id: &str,
        resources: &LinuxResources,
    ) -> Result<(), ClientError> {
        self.done(Request::UpdateResources {
            container_id: container_id.to_owned(),
            resources: Box::new(resources.clone()),
        })
    }

    pub fn list_processes(&mut self, container_id: &str) -> Result<Vec<i32>, ClientError> {
        let reply = self.call(Request::ListProcesses {
            container_id: container_id.to_owned(),
        })?;
        let pids = expect_reply!(reply, "list_processes", Reply::Processes(pids) => pids)?;
        pids.into_iter()
            .map(|pid| checked_pid("list_processes", pid))
            .collect()
    }

    pub fn remove_container(&mut self, container_id: &str) -> Result<(), ClientError> {
        self.done(Request::RemoveContainer {
            container_id: container_id.to_owned(),
        })
    }

    pub fn power_off(&mut self) -> Result<(), ClientError> {
        self.done(Request::PowerOff)
    }

    /// Bounds how long each read or write of a call may wait (`None`: for ever). A guest that
    /// accepted the connection but never answers then fails the call instead of hanging it.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.stream.set_read_timeout(timeout)?;
        self.stream.set_write_timeout(timeout)
    }

    /// Has the next calls, until set again, wait for their reply for as long as `patience`
    /// allows (instead of the read timeout alone, which then bounds only a reply that has
    /// begun to arrive). `None`: the read timeout alone.
    pub fn set_patience(&mut self, patience: Option<Patience>) {
        self.patience = patience;
    }

    /// Returns once the reply has begun to arrive (or the connection failed: the read says
    /// how), asking the patience, if any, between slices of waiting.
    fn await_reply(&mut self) -> Result<(), ClientError> {
        let Some(patience) = self.patience.as_mut() else {
            return Ok(());
        };
        let slice = PATIENCE_SLICE.as_millis() as libc::c_int;
        loop {
            let mut poll = libc::pollfd {
                fd: self.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, valid for the call; the fd is the stream's own.
            let ready = unsafe { libc::poll(&mut poll, 1, slice) };
            if ready > 0 {
                return Ok(());
            }
            if ready < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(ClientError::Poll(error));
                }
            }
            patience().map_err(ClientError::NoProgress)?;
        }
    }

    /// The raw stream, for tests that send malformed frames.
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent that took the connection and never answers fails the call once the timeout
    /// is up, instead of hanging the caller (the wait for a restored agent asks again then).
    #[test]
    fn a_call_to_an_agent_that_never_answers_times_out() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut client = AgentClient::over(ours);
        client
            .set_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let started = std::time::Instant::now();
        let err = client.hello().unwrap_err();
        assert!(matches!(err, ClientError::Frame(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(theirs);
    }

    #[test]
    fn numbers_from_the_agent_are_checked() {
        assert_eq!(checked_pid("exec_process", 1).unwrap(), 1);
        assert_eq!(checked_pid("exec_process", PID_MAX).unwrap(), PID_MAX);
        for pid in [0, -1, i32::MIN, PID_MAX + 1] {
            let err = checked_pid("exec_process", pid).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("the agent answered exec_process with pid {pid}")
            );
        }
        let status = |code, signal| ExitStatus {
            code,
            signal,
            oom_killed: false,
        };
        for ok in [
            status(Some(0), None),
            status(Some(255), None),
            status(None, Some(9)),
            status(None, Some(64)),
        ] {
            assert_eq!(checked_exit(ok).unwrap(), ok);
        }
        for bad in [
            status(Some(256), None),
            status(Some(-1), None),
            status(None, Some(0)),
            status(None, Some(65)),
            status(None, Some(-9)),
            status(Some(0), Some(9)),
            status(None, None),
        ] {
            assert!(checked_exit(bad).is_err(), "{bad:?}");
        }
    }

    /// With patience, a reply may come after the read timeout (a slow guest), and the call
    /// gives up when the patience says so, with its reason (a guest making no progress).
    #[test]
    fn patience_decides_how_long_a_reply_is_awaited() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut client = AgentClient::over(ours);
        client
            .set_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        client.set_patience(Some(Box::new(|| Ok(()))));
        let agent = std::thread::spawn(move || {
            let request: RequestEnvelope = read_frame(&mut theirs).unwrap();
            std::thread::sleep(Duration::from_millis(700));
            let reply = ReplyEnvelope {
                id: request.id,
                result: Ok(Reply::Done),
            };
            write_frame(&mut theirs, &reply).unwrap();
            theirs
        });
        client.signal("c1", None, 15, false).unwrap();
        let _theirs = agent.join().unwrap();

        let mut asked = 0;
        client.set_patience(Some(Box::new(move || {
            asked += 1;
            if asked < 4 {
                Ok(())
            } else {
                Err(format!("asked {asked} times"))
            }
        })));
        let started = std::time::Instant::now();
        let err = client.signal("c1", None, 15, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the guest agent did not answer: asked 4 times"
        );
        assert!(
            started.elapsed() >= PATIENCE_SLICE * 3,
            "{:?}",
            started.elapsed()
        );
    }

    /// A hostile agent's pid reaches no caller: the reply is an error.
    #[test]
    fn a_reply_with_a_bad_pid_is_an_error() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut client = AgentClient::over(ours);
        let agent = std::thread::spawn(move || {
            let request: RequestEnvelope = read_frame(&mut theirs).unwrap();
            let reply = ReplyEnvelope {
                id: request.id,
                result: Ok(Reply::Pid(-1)),
            };
            write_frame(&mut theirs, &reply).unwrap();
        });
        let err = client.start_container("c1").unwrap_err();
        assert!(matches!(err, ClientError::Invalid { .. }), "{err}");
        agent.join().unwrap();
    }
}
