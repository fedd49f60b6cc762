//! The control socket: how verbs running in other processes reach what only the process
//! holding a sandbox can do (its VMM: stop and start the vCPUs). The monitor serves it in the
//! container's directory; one JSON request per connection, one JSON reply.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cocoon_agent_protocol::client::{bind_unix, connect_unix};
use serde::{Deserialize, Serialize};

/// Longest request line we read: requests are a few dozen bytes.
const MAX_REQUEST: u64 = 4096;

/// Long enough for a pause of a busy VM, short enough that a wedged monitor fails the verb.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Pause,
    Resume,
    /// A signal for the container's init (`all`: every process) while the VM may be paused.
    Signal {
        signal: i32,
        all: bool,
    },
    /// Carry the interfaces the engine has put into the monitor's own network namespace
    /// since the VM started (Docker's prestart hook does, during `create`) into the VM, before
    /// the container starts.
    CarryNetwork,
    /// Save the VM to `dir` (see `checkpoint.rs`); with `leave_running` it goes on, else the
    /// container stops, as a runc checkpoint leaves it.
    Checkpoint {
        dir: PathBuf,
        leave_running: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Done,
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the container's monitor at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the container's monitor did not answer: {0}")]
    Io(#[from] std::io::Error),
    #[error("the container's monitor gave a reply we do not understand: {0}")]
    Garbled(String),
    #[error("{0}")]
    Refused(String),
}

/// Sends `request` to the monitor listening on `socket` and waits for its answer.
pub fn call(socket: &Path, request: &Request) -> Result<(), ControlError> {
    let mut stream = connect_unix(socket).map_err(|source| ControlError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut line =
        serde_json::to_string(request).map_err(|e| ControlError::Garbled(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    match serde_json::from_str(reply.trim()) {
        Ok(Reply::Done) => Ok(()),
        Ok(Reply::Refused(why)) => Err(ControlError::Refused(why)),
        Err(e) => Err(ControlError::Garbled(format!("{e}: {:?}", reply.trim()))),
    }
}

/// Reads one request; anything else gets a refusal rather than ending the server.
fn read_request(stream: &UnixStream) -> Result<Request, String> {
    let mut line = String::new();
    BufReader::new(std::io::Read::take(stream, MAX_REQUEST))
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the request: {e}"))?;
    serde_json::from_str(line.trim()).map_err(|e| format!("malformed request: {e}"))
}

/// Serves the control socket at `socket` on a thread of its own, for as long as the process
/// lives. Requests are handled one at a time, in the order they come.
pub fn serve(
    socket: &Path,
    handler: impl Fn(Request) -> Reply + Send + 'static,
) -> std::io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener: UnixListener = bind_unix(socket)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = stream.set_read_timeout(Some(REPLY_TIMEOUT));
                let reply = match read_request(&stream) {
                    Ok(request) => handler(request),
                    Err(why) => Reply::Refused(why),
                };
                let mut line = serde_json::to_string(&reply).unwrap_or_default();
                line.push('\n');
                let _ = (&stream).write_all(line.as_bytes());
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cocoon-control-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("control.sock")
    }

    #[test]
    fn requests_reach_the_handler_and_refusals_come_back() {
        let path = socket("roundtrip");
        serve(&path, |request| match request {
            Request::Pause => Reply::Done,
            Request::Resume => Reply::Refused("container x is not paused".into()),
            Request::Signal { signal, .. } => Reply::Refused(format!("signal {signal}")),
            Request::Checkpoint { .. } | Request::CarryNetwork => Reply::Done,
        })
        .unwrap();
        call(&path, &Request::Pause).unwrap();
        let err = call(&path, &Request::Resume).unwrap_err();
        assert_eq!(err.to_string(), "container x is not paused");
        let err = call(
            &path,
            &Request::Signal {
                signal: 9,
                all: false,
            },
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "signal 9");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn malformed_requests_are_refused_and_the_server_goes_on() {
        let path = socket("malformed");
        serve(&path, |_| Reply::Done).unwrap();
        for garbage in ["{\"op\":\"reboot\"}\n", "not json\n", "\n"] {
            let mut stream = connect_unix(&path).unwrap();
            stream.write_all(garbage.as_bytes()).unwrap();
            let mut reply = String::new();
            BufReader::new(stream).read_line(&mut reply).unwrap();
            let reply: Reply = serde_json::from_str(reply.trim()).unwrap();
            assert!(
                matches!(&reply, Reply::Refused(why) if why.starts_with("malformed request")),
                "{garbage:?} got {reply:?}"
            );
        }
        call(&path, &Request::Pause).unwrap();
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_missing_monitor_is_a_clear_error() {
        let err = call(Path::new("/nonexistent/control.sock"), &Request::Pause).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot reach the container's monitor at /nonexistent/control.sock"),
            "{err}"
        );
    }
}
