//! Process stdio over vsock. The host opens one connection per stream on [`STDIO_PORT`] and
//! names the process and stream in a first frame; the agent parks it until the create or exec
//! request that uses it. Each stream is then relayed by a thread between the vsock connection
//! and a pipe (or the pty master): processes get real pipes and ttys, as under runc, so
//! `/dev/stdout` and `isatty` behave.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cocoon_agent_protocol::frame::{read_frame, write_frame};
use cocoon_agent_protocol::message::{
    AgentError, ErrorKind, PROTOCOL_VERSION, STDIO_PORT, StdioAttach, StdioConfig, StdioStream,
    valid_id,
};

use crate::vsock;

type Key = (String, Option<String>, StdioStream);

#[derive(Default)]
struct Parked {
    streams: Mutex<HashMap<Key, File>>,
    arrived: Condvar,
}

fn parked() -> &'static Parked {
    static PARKED: OnceLock<Parked> = OnceLock::new();
    PARKED.get_or_init(Parked::default)
}

/// Accepts stdio connections forever.
pub fn serve() {
    let listener = match vsock::Listener::bind(STDIO_PORT) {
        Ok(l) => l,
        Err(e) => {
            crate::console::line(&format!(
                "cocoon-agent: cannot listen on vsock port {STDIO_PORT}: {e}"
            ));
            return;
        }
    };
    loop {
        match listener.accept() {
            Ok(conn) => {
                let _ = std::thread::Builder::new()
                    .name("stdio-attach".into())
                    .spawn(move || attach(conn));
            }
            Err(e) => crate::console::line(&format!("cocoon-agent: stdio accept: {e}")),
        }
    }
}

fn attach(mut conn: File) {
    // A peer that connects and says nothing must not hold a thread forever.
    vsock::set_read_timeout(&conn, Some(Duration::from_secs(10)));
    let result = read_frame::<_, StdioAttach>(&mut conn)
        .map_err(|e| AgentError::new(ErrorKind::BadRequest, e.to_string()))
        .and_then(|attach| {
            if attach.version != PROTOCOL_VERSION {
                return Err(AgentError::new(
                    ErrorKind::Version,
                    format!(
                        "protocol version {} is not {PROTOCOL_VERSION}",
                        attach.version
                    ),
                ));
            }
            if !valid_id(&attach.container_id) || !attach.exec_id.as_deref().is_none_or(valid_id) {
                return Err(AgentError::new(
                    ErrorKind::InvalidArgument,
                    "invalid container or exec id",
                ));
            }
            Ok((attach.container_id, attach.exec_id, attach.stream))
        });
    vsock::set_read_timeout(&conn, None);
    match result {
        Ok(key) => {
            let parked = parked();
            let mut streams = parked.streams.lock().unwrap_or_else(|e| e.into_inner());
            if streams.contains_key(&key) {
                drop(streams);
                let _ = write_frame(
                    &mut conn,
                    &Err::<(), _>(AgentError::new(
                        ErrorKind::AlreadyExists,
                        "stream already attached",
                    )),
                );
                return;
            }
            // Acknowledge before parking: once the host has the ack, the stream is findable.
            if write_frame(&mut conn, &Ok::<(), AgentError>(())).is_ok() {
                streams.insert(key, conn);
                parked.arrived.notify_all();
            }
        }
        Err(e) => {
            let _ = write_frame(&mut conn, &Err::<(), _>(e));
        }
    }
}

/// Takes the parked stream for `key`, waiting up to `timeout` for it to arrive.
fn take(key: &Key, timeout: Duration) -> Option<File> {
    let parked = parked();
    let deadline = Instant::now() + timeout;
    let mut streams = parked.streams.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(conn) = streams.remove(key) {
            return Some(conn);
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        streams = parked
            .arrived
            .wait_timeout(streams, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Drops streams parked for a container that is going away.
pub fn discard(container_id: &str) {
    let parked = parked();
    let mut streams = parked.streams.lock().unwrap_or_else(|e| e.into_inner());
    streams.retain(|(id, _, _), _| id != container_id);
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid out-array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two new fds that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A new pty: the master, and the slave's path and fd.
fn open_pty() -> std::io::Result<(OwnedFd, PathBuf, OwnedFd)> {
    // SAFETY: posix_openpt returns a new fd or -1.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if master < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: master is a new fd nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: master is a pty master; name is a writable buffer of the given length.
    let rc = unsafe {
        if libc::grantpt(master.as_raw_fd()) != 0 || libc::unlockpt(master.as_raw_fd()) != 0 {
            -1
        } else {
            libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len())
        }
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ptsname_r wrote a NUL-terminated string into name.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    let path = PathBuf::from(path.to_string_lossy().into_owned());
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&path)?;
    Ok((master, path, slave.into()))
}

use std::os::unix::fs::OpenOptionsExt;

/// The process's side of its stdio, for the spawner to dup onto 0, 1 and 2.
pub struct ChildStdio {
    pub fds: [OwnedFd; 3],
    /// The pty slave's path, when the process has a terminal (for /dev/console).
    pub console: Option<PathBuf>,
}

/// The agent's side: what to relay once the process exists.
pub struct HostStdio {
    relays: Vec<(File, File, bool)>,
    /// The pty master, kept for resizes.
    pub pty_master: Option<File>,
    /// The vsock connections, to cut when the container is removed.
    pub connections: Vec<File>,
}

/// A new fd on /dev/null: a dup of one opened once, which spares a path lookup per stream.
fn devnull() -> std::io::Result<OwnedFd> {
    static DEVNULL: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = DEVNULL.get() {
        return fd.try_clone();
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    DEVNULL.get_or_init(|| file.into()).try_clone()
}

const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// Collects the host's streams named by `config` and makes the pipes or pty.
pub fn prepare(
    container_id: &str,
    exec_id: Option<&str>,
    config: StdioConfig,
) -> Result<(ChildStdio, HostStdio), AgentError> {
    let key = |stream| (container_id.to_owned(), exec_id.map(str::to_owned), stream);
    let missing = |stream: StdioStream| {
        AgentError::new(
            ErrorKind::InvalidArgument,
            format!("the {stream:?} stream was not attached on vsock port {STDIO_PORT}"),
        )
    };
    let io =
        |what: &str, e: std::io::Error| AgentError::new(ErrorKind::Failed, format!("{what}: {e}"));
    let mut host = HostStdio {
        relays: Vec::new(),
        pty_master: None,
        connections: Vec::new(),
    };
    if config.terminal {
        let conn = take(&key(StdioStream::Terminal), ATTACH_TIMEOUT)
            .ok_or_else(|| missing(StdioStream::Terminal))?;
        let (master, path, slave) = open_pty().map_err(|e| io("open a pty", e))?;
        let master = File::from(master);
        let clone = |f: &File| f.try_clone().map_err(|e| io("dup", e));
        host.relays.push((clone(&conn)?, clone(&master)?, false));
        host.relays.push((clone(&master)?, clone(&conn)?, true));
        host.connections.push(conn);
        host.pty_master = Some(master);
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| io("dup", e));
        let fds = [dup(&slave)?, dup(&slave)?, slave];
        return Ok((
            ChildStdio {
                fds,
                console: Some(path),
            },
            host,
        ));
    }
    let mut fds = Vec::with_capacity(3);
    for (stream, wanted) in [
        (StdioStream::Stdin, config.stdin),
        (StdioStream::Stdout, config.stdout),
        (StdioStream::Stderr, config.stderr),
    ] {
        if !wanted {
            fds.push(devnull().map_err(|e| io("open /dev/null", e))?);
            continue;
        }
        let conn = take(&key(stream), ATTACH_TIMEOUT).ok_or_else(|| missing(stream))?;
        let (read, write) = pipe().map_err(|e| io("pipe", e))?;
        let keep = conn.try_clone().map_err(|e| io("dup", e))?;
        if stream == StdioStream::Stdin {
            host.relays.push((conn, File::from(write), false));
            fds.push(read);
        } else {
            host.relays.push((File::from(read), conn, true));
            fds.push(write);
        }
        host.connections.push(keep);
    }
    let fds: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|_| AgentError::new(ErrorKind::Failed, "stdio setup lost a stream"))?;
    Ok((ChildStdio { fds, console: None }, host))
}

impl HostStdio {
    /// Starts relaying. Call after the process exists and the agent's copies of the child's
    /// ends are closed, so EOF arrives when the process (and its children) close theirs.
    pub fn start_relays(&mut self) {
        for (from, to, to_vsock) in self.relays.drain(..) {
            let _ = std::thread::Builder::new()
                .name("stdio-relay".into())
                .spawn(move || relay(from, to, to_vsock));
        }
    }

    /// Cuts the host's connections, which ends their relays.
    pub fn close(&self) {
        for conn in &self.connections {
            // SAFETY: shutdown on a socket fd we hold; failure means it is already closed.
            unsafe { libc::shutdown(conn.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

fn relay(mut from: File, mut to: File, to_vsock: bool) {
    cocoon_agent_protocol::relay_until_eof(&mut from, &mut to);
    if to_vsock {
        vsock::shutdown_write(&to);
    }
}
