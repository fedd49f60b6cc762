//! Driving a guest's agent directly, as the runtime does: OCI specs like `runc spec` writes,
//! and a [`Guest`] whose containers run with their stdio collected.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread::JoinHandle;

use cocoon_agent_protocol::client::{AgentClient, ClientError, attach_stdio};
use cocoon_agent_protocol::message::{
    ContainerStatus, CreateContainer, ExitStatus, StdioConfig, StdioStream,
};
use oci_spec::runtime::Spec;
use serde_json::{Value, json};

/// The capabilities runc's `spec` gives a container.
pub const DEFAULT_CAPS: [&str; 8] = [
    "CAP_AUDIT_WRITE",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_SETUID",
    "CAP_SETGID",
];

/// What `runc spec` writes, running `args`.
pub fn spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": DEFAULT_CAPS, "effective": DEFAULT_CAPS, "permitted": DEFAULT_CAPS
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "cocoon",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "resources": {},
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

pub fn to_spec(value: Value) -> Box<Spec> {
    Box::new(serde_json::from_value(value).expect("the test spec is a valid OCI spec"))
}

pub fn reader(mut stream: UnixStream) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
}

pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

pub struct Guest {
    pub uds: PathBuf,
    pub disk: String,
}

impl Guest {
    pub fn client(&self) -> AgentClient {
        AgentClient::connect(&self.uds).expect("connect to the agent")
    }

    pub fn attach(&self, id: &str, exec_id: Option<&str>, stream: StdioStream) -> UnixStream {
        attach_stdio(&self.uds, id, exec_id, stream).expect("attach a stdio stream")
    }

    pub fn create(&self, id: &str, spec: Value, stdio: StdioConfig) -> Result<i32, ClientError> {
        self.client().create_container(CreateContainer {
            container_id: id.into(),
            spec: to_spec(spec),
            layers: vec![self.disk.clone()],
            shares: false,
            stdio,
            // Many containers share this guest.
            owns_guest: false,
            guest_network: false,
        })
    }

    /// create, start, feed stdin, collect stdout and stderr, wait, remove: `runc run`.
    pub fn run(&self, id: &str, spec: Value, stdin: Option<&[u8]>) -> Outcome {
        let stdio = StdioConfig {
            terminal: false,
            stdin: stdin.is_some(),
            stdout: true,
            stderr: true,
        };
        let input = stdin.map(|_| self.attach(id, None, StdioStream::Stdin));
        let stdout = reader(self.attach(id, None, StdioStream::Stdout));
        let stderr = reader(self.attach(id, None, StdioStream::Stderr));
        self.create(id, spec, stdio).expect("create");
        let mut client = self.client();
        client.start_container(id).expect("start");
        if let (Some(mut input), Some(data)) = (input, stdin) {
            input.write_all(data).expect("write stdin");
            input.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let status = self.client().wait(id, None).expect("wait");
        let outcome = Outcome {
            status,
            stdout: stdout.join().unwrap(),
            stderr: stderr.join().unwrap(),
        };
        assert_eq!(client.state(id).unwrap().status, ContainerStatus::Stopped);
        client.remove_container(id).expect("remove");
        outcome
    }

    /// `sh -c SCRIPT` in a default container with `edit` applied to the spec.
    pub fn sh(&self, id: &str, script: &str, edit: impl FnOnce(&mut Value)) -> Outcome {
        let mut spec = spec(&["sh", "-c", script]);
        edit(&mut spec);
        self.run(id, spec, None)
    }
}

pub fn exited(code: i32) -> ExitStatus {
    ExitStatus {
        code: Some(code),
        signal: None,
        oom_killed: false,
    }
}
