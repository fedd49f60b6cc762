//! A container process's stdio on the host side: our own fds 0, 1 and 2 relayed to the guest
//! on vsock streams, or a host pty (its master sent over the console socket) relayed to the
//! guest's pty.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cocoon_agent_protocol::client::attach_stdio;
use cocoon_agent_protocol::message::{StdioConfig, StdioStream};

use crate::console;

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("the process has a terminal but no --console-socket was given")]
    NoConsoleSocket,
    #[error("cannot open a pty: {0}")]
    Pty(std::io::Error),
    #[error("console socket {path}: {source}")]
    ConsoleSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("dup2 pty to fd {fd}: {source}")]
    Dup2 { fd: i32, source: std::io::Error },
    #[error("cannot attach the process's stdio: {0}")]
    Attach(cocoon_agent_protocol::client::ClientError),
    #[error("stdio relay: {0}")]
    Io(std::io::Error),
}

/// The streams of one process, attached and relaying.
pub struct Stdio {
    pub config: StdioConfig,
    /// Output relays: the process's output has all arrived when they end.
    relays: Vec<JoinHandle<()>>,
    /// The host pty's slave, for window-size changes.
    pub pty_slave: Option<OwnedFd>,
}

/// Copies `from` to `to` until EOF; then half-closes `shutdown`, so the peer sees EOF too.
fn relay(
    mut from: impl Read + Send + 'static,
    mut to: impl Write + Send + 'static,
    shutdown: Option<UnixStream>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        cocoon_agent_protocol::relay_until_eof(&mut from, &mut to);
        if let Some(socket) = shutdown {
            let _ = socket.shutdown(std::net::Shutdown::Write);
        }
    })
}

/// Our own fd `fd` as a File, if it is open.
fn inherited(fd: RawFd) -> Option<File> {
    // SAFETY: fcntl(F_GETFD) only asks whether fd is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: dup gives us our own copy of an open fd.
    let copy = unsafe { libc::dup(fd) };
    // SAFETY: copy is a new fd nothing else owns.
    (copy >= 0).then(|| unsafe { File::from_raw_fd(copy) })
}

/// Whether our fd `fd` is `/dev/null`: a stream the guest can give the process itself (it uses
/// its own /dev/null for a stream not attached) instead of relaying nothing over vsock, whose
/// every connection costs the guest emulated kernel work.
fn is_dev_null(fd: RawFd) -> bool {
    // SAFETY: stat is plain data, for which all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the stat buffer we own; a closed fd just fails.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3)
}

impl Stdio {
    /// Attaches the streams of process `exec_id` (None: the init) of container `id`.
    pub fn attach(
        uds: &Path,
        id: &str,
        exec_id: Option<&str>,
        terminal: bool,
        console_socket: Option<&Path>,
    ) -> Result<Stdio, StdioError> {
        let attach = |stream| attach_stdio(uds, id, exec_id, stream).map_err(StdioError::Attach);
        let e = StdioError::Io;
        if terminal {
            let socket = console_socket.ok_or(StdioError::NoConsoleSocket)?;
            let pty = console::open_pty().map_err(StdioError::Pty)?;
            console::send_fd(socket, pty.master.as_raw_fd()).map_err(|source| {
                StdioError::ConsoleSocket {
                    path: socket.to_owned(),
                    source,
                }
            })?;
            // SAFETY: the slave becomes our controlling terminal (we lead our own session), so
            // window-size changes reach us as SIGWINCH.
            unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCSCTTY, 0) };
            // The pty replaces the stdio we inherited from `create`, as it replaces runc's
            // init's: engines wait for those to close (containerd's shim reads `create`'s
            // output to EOF, so `docker run -it` would never start).
            for fd in 0..=2 {
                // SAFETY: dup2 onto our own standard fds; the slave stays open in `pty`.
                if unsafe { libc::dup2(pty.slave.as_raw_fd(), fd) } < 0 {
                    return Err(StdioError::Dup2 {
                        fd,
                        source: std::io::Error::last_os_error(),
                    });
                }
            }
            let conn = attach(StdioStream::Terminal)?;
            let slave = File::from(pty.slave.try_clone().map_err(e)?);
            let slave_in = slave.try_clone().map_err(e)?;
            let conn_in = conn.try_clone().map_err(e)?;
            let output = relay(conn, slave, None);
            // Input is not waited for at exit: the engine may keep the terminal open.
            relay(slave_in, conn_in, None);
            return Ok(Stdio {
                config: StdioConfig {
                    terminal: true,
                    ..StdioConfig::default()
                },
                relays: vec![output],
                pty_slave: Some(pty.slave),
            });
        }
        let mut stdio = Stdio {
            config: StdioConfig::default(),
            relays: Vec::new(),
            pty_slave: None,
        };
        if let Some(input) = inherited(0).filter(|_| !is_dev_null(0)) {
            let conn = attach(StdioStream::Stdin)?;
            let shutdown = conn.try_clone().map_err(e)?;
            relay(input, conn, Some(shutdown));
            stdio.config.stdin = true;
        }
        for (fd, stream) in [(1, StdioStream::Stdout), (2, StdioStream::Stderr)] {
            if let Some(output) = inherited(fd).filter(|_| !is_dev_null(fd)) {
                let conn = attach(stream)?;
                stdio.relays.push(relay(conn, output, None));
                match stream {
                    StdioStream::Stdout => stdio.config.stdout = true,
                    _ => stdio.config.stderr = true,
                }
            }
        }
        Ok(stdio)
    }

    /// No streams: a process whose stdio stayed with a VM it was restored from.
    pub fn detached() -> Stdio {
        Stdio {
            config: StdioConfig::default(),
            relays: Vec::new(),
            pty_slave: None,
        }
    }

    pub fn window_size(&self) -> Option<(u16, u16)> {
        self.pty_slave
            .as_ref()
            .and_then(|s| console::window_size(s.as_raw_fd()))
    }

    /// Waits (a bounded time) for output the process wrote before it exited.
    pub fn drain(self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for relay in self.relays {
            while !relay.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_null_is_told_from_other_files() {
        let null = File::open("/dev/null").unwrap();
        assert!(is_dev_null(null.as_raw_fd()));
        let zero = File::open("/dev/zero").unwrap();
        assert!(!is_dev_null(zero.as_raw_fd()));
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(!is_dev_null(a.as_raw_fd()));
        assert!(!is_dev_null(-1));
    }
}
