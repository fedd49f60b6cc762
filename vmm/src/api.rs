//! The control socket (`cocoon-vmm --api-sock PATH`): one JSON object per line in, one per line
//! out, on a Unix socket.
//!
//! ```text
//! {"action":"pause"}   -> {"ok":true,"state":"paused"}
//! {"action":"resume"}  -> {"ok":true,"state":"running"}
//! {"action":"state"}   -> {"ok":true,"state":"paused","vcpus":["paused"],"exits":1234,"agent_up":false}
//! {"action":"snapshot","path":"DIR"} -> {"ok":true,"state":"paused"}  (the VM must be paused)
//! {"action":"swap_disk","id":"block1","path":"FILE","read_only":true} -> {"ok":true,"state":...}
//! anything else        -> {"ok":false,"error":"..."}
//! ```
//!
//! Whoever can connect controls the VM: the socket is as private as its directory. Every line is
//! untrusted input; a bad one gets an error reply and the connection stays usable.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};

use crate::config::DiskConfig;
use crate::lifecycle::ExitReason;
use crate::snapshot::SnapshotError;
use crate::vcpu::VcpuState;
use crate::vm::{SwapError, Vm, VmError, VmState};

/// Longest request line accepted; a request is a few dozen bytes.
pub const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Pause,
    Resume,
    State,
    /// Save the paused VM to this directory.
    Snapshot(PathBuf),
    /// Give a block device a new backing file.
    SwapDisk {
        id: String,
        disk: DiskConfig,
    },
}

/// Parses one request line (without its newline).
pub fn parse(line: &str) -> Result<Request, String> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| format!("request is not JSON: {e}"))?;
    let Value::Object(object) = value else {
        return Err("request must be a JSON object like {\"action\":\"state\"}".into());
    };
    let action = match object.get("action") {
        None => return Err("request has no \"action\"".into()),
        Some(Value::String(action)) => action.as_str(),
        Some(_) => return Err("\"action\" must be a string".into()),
    };
    let allowed: &[&str] = match action {
        "snapshot" => &["action", "path"],
        "swap_disk" => &["action", "id", "path", "read_only"],
        _ => &["action"],
    };
    if let Some(key) = object.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("unknown field {key:?} for action {action:?}"));
    }
    match action {
        "pause" => Ok(Request::Pause),
        "resume" => Ok(Request::Resume),
        "state" => Ok(Request::State),
        "snapshot" => match object.get("path") {
            Some(Value::String(path)) if !path.is_empty() => {
                Ok(Request::Snapshot(PathBuf::from(path)))
            }
            _ => Err("snapshot needs a \"path\": the directory to save to".into()),
        },
        "swap_disk" => {
            let text = |key: &str| match object.get(key) {
                Some(Value::String(v)) if !v.is_empty() => Ok(v.clone()),
                _ => Err(format!("swap_disk needs {key:?}, a non-empty string")),
            };
            let read_only = match object.get("read_only") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err("\"read_only\" must be true or false".into()),
            };
            Ok(Request::SwapDisk {
                id: text("id")?,
                disk: DiskConfig {
                    path: PathBuf::from(text("path")?),
                    read_only,
                },
            })
        }
        other => Err(format!(
            "unknown action {other:?} (want pause, resume, state, snapshot or swap_disk)"
        )),
    }
}

/// What the socket drives: the VM handle, or a stand-in in the tests.
pub trait Target {
    fn pause(&self) -> Result<(), VmError>;
    fn resume(&self) -> Result<(), VmError>;
    fn state(&self) -> VmState;
    fn vcpu_states(&self) -> Vec<VcpuState>;
    /// vCPU exits to the VMM so far, all reasons together: frozen while paused.
    fn exits(&self) -> u64;
    fn agent_up(&self) -> bool;
    fn snapshot(&self, dir: &Path) -> Result<(), SnapshotError>;
    fn swap_disk(&self, id: &str, disk: DiskConfig) -> Result<(), SwapError>;
}

impl Target for Vm {
    fn pause(&self) -> Result<(), VmError> {
        Vm::pause(self)
    }
    fn resume(&self) -> Result<(), VmError> {
        Vm::resume(self)
    }
    fn state(&self) -> VmState {
        Vm::state(self)
    }
    fn vcpu_states(&self) -> Vec<VcpuState> {
        Vm::vcpu_states(self)
    }
    fn exits(&self) -> u64 {
        self.lifecycle()
            .exits
            .snapshot()
            .iter()
            .map(|(_, n)| n)
            .sum()
    }
    fn agent_up(&self) -> bool {
        self.lifecycle().agent_up().is_some()
    }
    fn snapshot(&self, dir: &Path) -> Result<(), SnapshotError> {
        Vm::snapshot(self, dir)
    }
    fn swap_disk(&self, id: &str, disk: DiskConfig) -> Result<(), SwapError> {
        Vm::swap_disk(self, id, disk)
    }
}

fn error(message: impl Into<String>) -> Value {
    json!({"ok": false, "error": message.into()})
}

fn state_of(target: &impl Target) -> Value {
    let state = target.state();
    let mut reply = json!({
        "ok": true,
        "state": state.name(),
        "vcpus": target.vcpu_states().iter().map(|s| s.name()).collect::<Vec<_>>(),
        "exits": target.exits(),
        "agent_up": target.agent_up(),
    });
    if let VmState::Ended(reason) = state {
        reply["reason"] = reason.name().into();
        reply["message"] = reason.to_string().into();
    }
    reply
}

fn ended_error(reason: &ExitReason) -> Value {
    error(format!("the VM has ended: {reason}"))
}

/// Answers one request line.
pub fn handle_line(target: &impl Target, line: &str) -> Value {
    let request = match parse(line.trim()) {
        Ok(request) => request,
        Err(e) => return error(e),
    };
    let done = match request {
        Request::State => return state_of(target),
        Request::Pause => target.pause(),
        Request::Resume => target.resume(),
        Request::Snapshot(dir) => {
            return match target.snapshot(&dir) {
                Ok(()) => json!({"ok": true, "state": target.state().name()}),
                Err(e) => error(e.to_string()),
            };
        }
        Request::SwapDisk { id, disk } => {
            return match target.swap_disk(&id, disk) {
                Ok(()) => json!({"ok": true, "state": target.state().name()}),
                Err(e) => error(e.to_string()),
            };
        }
    };
    match done {
        Ok(()) => json!({"ok": true, "state": target.state().name()}),
        Err(VmError::Ended(reason)) => ended_error(&reason),
        Err(e) => error(e.to_string()),
    }
}

/// Serves one connection until the peer closes it.
pub fn serve_connection(target: &impl Target, stream: UnixStream) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        let complete = line.last() == Some(&b'\n');
        let reply = if !complete && line.len() > MAX_LINE {
            // No way to find the next request's start: answer and hang up.
            let reply = error(format!("request longer than {MAX_LINE} bytes"));
            writeln!(writer, "{reply}")?;
            return Ok(());
        } else {
            match std::str::from_utf8(&line) {
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => handle_line(target, text),
                Err(_) => error("request is not UTF-8"),
            }
        };
        writeln!(writer, "{reply}")?;
    }
}

/// Serves `listener` on a thread of its own, one more thread per connection, for as long as the
/// process lives.
pub fn serve(listener: UnixListener, vm: Arc<Vm>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("cocoon-api".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!("api socket: {e}");
                        continue;
                    }
                };
                let vm = vm.clone();
                let spawned = std::thread::Builder::new()
                    .name("cocoon-api-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve_connection(&*vm, stream) {
                            tracing::debug!("api connection: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!("api socket: cannot serve a connection: {e}");
                }
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn requests_parse() {
        assert_eq!(parse(r#"{"action":"pause"}"#), Ok(Request::Pause));
        assert_eq!(parse(r#" { "action" : "resume" } "#), Ok(Request::Resume));
        assert_eq!(parse(r#"{"action":"state"}"#), Ok(Request::State));
        assert_eq!(
            parse(r#"{"action":"snapshot","path":"/tmp/s"}"#),
            Ok(Request::Snapshot("/tmp/s".into()))
        );
        assert_eq!(
            parse(r#"{"action":"swap_disk","id":"block1","path":"/l.img","read_only":true}"#),
            Ok(Request::SwapDisk {
                id: "block1".into(),
                disk: DiskConfig {
                    path: "/l.img".into(),
                    read_only: true
                }
            })
        );
    }

    #[test]
    fn bad_requests_get_clear_errors() {
        let cases = [
            ("", "not JSON"),
            ("pause", "not JSON"),
            (r#"{"action":"pause""#, "not JSON"),
            ("[1,2]", "must be a JSON object"),
            ("\"pause\"", "must be a JSON object"),
            ("{}", "no \"action\""),
            (r#"{"action":3}"#, "must be a string"),
            (r#"{"action":null}"#, "must be a string"),
            (r#"{"action":"PAUSE"}"#, "unknown action \"PAUSE\""),
            (
                r#"{"action":"reboot"}"#,
                "want pause, resume, state, snapshot or swap_disk",
            ),
            (r#"{"action":"snapshot"}"#, "snapshot needs a \"path\""),
            (
                r#"{"action":"swap_disk","path":"/x"}"#,
                "swap_disk needs \"id\"",
            ),
            (
                r#"{"action":"swap_disk","id":"block0","path":"/x","read_only":"yes"}"#,
                "must be true or false",
            ),
            (r#"{"action":"snapshot","path":""}"#, "needs a \"path\""),
            (r#"{"action":"snapshot","path":7}"#, "needs a \"path\""),
            (
                r#"{"action":"pause","path":"/x"}"#,
                "unknown field \"path\" for action \"pause\"",
            ),
            (
                r#"{"action":"pause","force":true}"#,
                "unknown field \"force\"",
            ),
        ];
        for (line, want) in cases {
            let err = parse(line).expect_err(line);
            assert!(err.contains(want), "{line:?}: want {want:?} in {err:?}");
        }
    }

    #[derive(Default)]
    struct Fake {
        running: Mutex<bool>,
        ended: Mutex<Option<ExitReason>>,
    }

    impl Target for Fake {
        fn pause(&self) -> Result<(), VmError> {
            self.resume_or_pause(false)
        }
        fn resume(&self) -> Result<(), VmError> {
            self.resume_or_pause(true)
        }
        fn state(&self) -> VmState {
            match self.ended.lock().unwrap().clone() {
                Some(reason) => VmState::Ended(reason),
                None if *self.running.lock().unwrap() => VmState::Running,
                None => VmState::Paused,
            }
        }
        fn vcpu_states(&self) -> Vec<VcpuState> {
            vec![VcpuState::Paused; 2]
        }
        fn exits(&self) -> u64 {
            42
        }
        fn agent_up(&self) -> bool {
            false
        }
        fn swap_disk(&self, id: &str, _disk: DiskConfig) -> Result<(), SwapError> {
            Err(SwapError::NoSuchDisk(id.into()))
        }
        fn snapshot(&self, _dir: &Path) -> Result<(), SnapshotError> {
            if *self.running.lock().unwrap() {
                Err(SnapshotError::NotPaused)
            } else {
                Ok(())
            }
        }
    }

    impl Fake {
        fn resume_or_pause(&self, run: bool) -> Result<(), VmError> {
            if let Some(reason) = self.ended.lock().unwrap().clone() {
                return Err(VmError::Ended(reason));
            }
            *self.running.lock().unwrap() = run;
            Ok(())
        }
    }

    #[test]
    fn replies() {
        let fake = Fake::default();
        assert_eq!(
            handle_line(&fake, "{\"action\":\"resume\"}\n").to_string(),
            r#"{"ok":true,"state":"running"}"#
        );
        assert_eq!(
            handle_line(&fake, r#"{"action":"pause"}"#).to_string(),
            r#"{"ok":true,"state":"paused"}"#
        );
        let state = handle_line(&fake, r#"{"action":"state"}"#);
        assert_eq!(state["state"], "paused");
        assert_eq!(state["vcpus"], json!(["paused", "paused"]));
        assert_eq!(state["exits"], 42);
        let bad = handle_line(&fake, "{\"action\":\"nope\"}");
        assert_eq!(bad["ok"], false);
        assert!(bad["error"].as_str().unwrap().contains("unknown action"));

        *fake.ended.lock().unwrap() = Some(ExitReason::PoweredOff);
        let state = handle_line(&fake, r#"{"action":"state"}"#);
        assert_eq!(state["state"], "ended");
        assert_eq!(state["reason"], "powered_off");
        let late = handle_line(&fake, r#"{"action":"resume"}"#);
        assert_eq!(
            late,
            json!({"ok": false, "error": "the VM has ended: guest powered off"})
        );
    }

    #[test]
    fn a_connection_survives_bad_lines_and_refuses_huge_ones() {
        let fake = Arc::new(Fake::default());
        let (client, server) = UnixStream::pair().unwrap();
        let served = {
            let fake = fake.clone();
            std::thread::spawn(move || serve_connection(&*fake, server))
        };
        let mut writer = client.try_clone().unwrap();
        let mut reader = BufReader::new(client);
        let mut ask = |line: &[u8]| {
            writer.write_all(line).unwrap();
            let mut reply = String::new();
            reader.read_line(&mut reply).unwrap();
            serde_json::from_str::<Value>(&reply).unwrap()
        };
        assert_eq!(ask(b"\xff\xfe\n")["error"], "request is not UTF-8");
        assert_eq!(ask(b"garbage\n")["ok"], false);
        assert_eq!(ask(b"\n{\"action\":\"state\"}\n")["state"], "paused");
        let huge = vec![b'x'; MAX_LINE + 10];
        assert!(
            ask(&huge)["error"]
                .as_str()
                .unwrap()
                .contains("longer than")
        );
        served.join().unwrap().unwrap();
    }
}
