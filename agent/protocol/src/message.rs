//! The agent protocol's requests and replies (see docs/protocol.md).
//!
//! One request at a time per control connection: the host writes a [`RequestEnvelope`], the
//! agent answers with a [`ReplyEnvelope`] carrying the same id. Requests that block (waiting for
//! an exit) are sent on a connection of their own.

use std::collections::BTreeMap;

use oci_spec::runtime::{LinuxResources, Process, Spec};
use serde::{Deserialize, Serialize};

/// Bumped on any change the other side could misread. The agent refuses other versions with
/// [`ErrorKind::Version`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port of the agent's control service.
pub const CONTROL_PORT: u32 = 1024;

/// The vsock port where the host attaches process stdio streams.
pub const STDIO_PORT: u32 = 1026;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestEnvelope {
    pub version: u32,
    pub id: u64,
    pub request: Request,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplyEnvelope {
    pub id: u64,
    pub result: Result<Reply, AgentError>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "method", content = "params", rename_all = "snake_case")]
pub enum Request {
    /// Which agent and guest this is. Also the cheapest liveness probe.
    Hello,
    /// The guest's identity from the host: hostname, wall clock, fresh entropy.
    SetupGuest(GuestSetup),
    /// Prepares a container and its init process, stopped before exec (runc's `create`).
    CreateContainer(CreateContainer),
    /// Lets the init process created by `CreateContainer` exec (runc's `start`).
    StartContainer { container_id: String },
    /// Starts a further process inside a running container's namespaces and cgroup.
    ExecProcess(ExecProcess),
    /// Sends `signal` to a process, or with `all` to every process of the container.
    Signal {
        container_id: String,
        exec_id: Option<String>,
        signal: i32,
        all: bool,
    },
    /// Blocks until the process has exited; replies [`Reply::Exited`].
    Wait {
        container_id: String,
        exec_id: Option<String>,
    },
    /// Sets a process's terminal size.
    ResizeTerminal {
        container_id: String,
        exec_id: Option<String>,
        rows: u16,
        cols: u16,
    },
    /// Status and pid of the init process.
    State { container_id: String },
    /// cgroup figures of a container.
    Stats { container_id: String },
    /// Writes new limits (an OCI `linux.resources`) to a container's cgroup (runc's `update`).
    /// Only what is given changes; zero means unchanged, as with runc.
    UpdateResources {
        container_id: String,
        resources: Box<LinuxResources>,
    },
    /// Guest pids of a container's processes.
    ListProcesses { container_id: String },
    /// Kills whatever is left of a container and removes its mounts, cgroup and state.
    RemoveContainer { container_id: String },
    /// The guest-side cost counters (forks, page faults, CPU time) so far, for measuring the
    /// start path; replies [`Reply::Counters`].
    Counters,
    /// Powers the VM off after replying.
    PowerOff,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Reply {
    Hello(AgentInfo),
    Done,
    /// The guest pid of the process that was created or started.
    Pid(i32),
    Exited(ExitStatus),
    State(ContainerState),
    Stats(ContainerStats),
    Processes(Vec<i32>),
    Counters(GuestCounters),
}

/// What the guest has spent so far, as the agent can read it without perf: deltas between two
/// readings are what the requests in between cost. All counts since the guest booted (or, for
/// the agent's own, since it started).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCounters {
    /// Processes and threads created in the whole guest (`processes` in /proc/stat).
    pub forks: u64,
    /// Minor and major page faults of the agent and of its reaped children.
    pub minor_faults: u64,
    pub major_faults: u64,
    /// Voluntary and involuntary context switches of the agent and its reaped children.
    pub context_switches: u64,
    /// CPU time (user + system) of the agent and its reaped children, in microseconds.
    pub cpu_us: u64,
    /// CPU time of the whole guest (all CPUs, all modes but idle), in microseconds.
    pub guest_cpu_us: u64,
    /// Read-like and write-like system calls of the agent (`syscr`/`syscw` in /proc/self/io;
    /// 0 when the kernel does not count them).
    pub read_syscalls: u64,
    pub write_syscalls: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub protocol_version: u32,
    pub agent_version: String,
    pub kernel_release: String,
    pub cpus: u32,
    pub memory_mib: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GuestSetup {
    pub hostname: Option<String>,
    /// Wall-clock time in nanoseconds since the Unix epoch.
    pub realtime_ns: Option<u64>,
    /// Bytes mixed into (and credited to) the guest's entropy pool.
    #[serde(default)]
    pub entropy: Vec<u8>,
    /// What containers read from `/proc/sys/kernel/random/boot_id` from now on (a UUID): a VM
    /// restored from a snapshot keeps its kernel's, which its siblings share.
    #[serde(default)]
    pub boot_id: Option<String>,
    /// The engine's network for the guest's root network namespace: what containers sharing
    /// it see (see [`CreateContainer::guest_network`]), also those created before it came.
    /// Applied after the identity above. Then the NICs left down that no network named are
    /// moved out of sight (into a network namespace of the agent's that nothing runs in), and
    /// back when a later network names one: so an empty network (a template's, a clone's
    /// without one) leaves the guest's namespace with loopback only.
    #[serde(default)]
    pub network: NetworkSetup,
}

/// The interfaces and routes the engine gave the container, as the host read them in the
/// container's network namespace, to be made again in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSetup {
    #[serde(default)]
    pub interfaces: Vec<GuestInterface>,
    /// Added after every interface is configured, in order, to the main table.
    #[serde(default)]
    pub routes: Vec<GuestRoute>,
}

/// One virtio-net NIC of the guest made into one of the engine's interfaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInterface {
    /// The NIC's MAC as the guest found it (the VMM's, from its config space): how the agent
    /// finds the device. VMs come from snapshots taken before the container was known, so it is
    /// not the engine's.
    pub device_mac: [u8; 6],
    /// The engine's name for the interface (`eth0`): 1 to 15 bytes, no `/`, `:` or space.
    pub name: String,
    /// The engine's MAC, which the interface gets.
    pub mac: [u8; 6],
    /// 68 to 65535 (1280 or more with an IPv6 address).
    pub mtu: u32,
    #[serde(default)]
    pub addresses: Vec<IpPrefix>,
}

/// An address with its prefix length (`10.88.0.5/16`); for a route, its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpPrefix {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

/// A route of the main table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRoute {
    /// `None` is the default route of the gateway's family.
    #[serde(default)]
    pub destination: Option<IpPrefix>,
    #[serde(default)]
    pub gateway: Option<std::net::IpAddr>,
    /// The name of one of [`NetworkSetup::interfaces`].
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub metric: Option<u32>,
    /// Scope link; implied for a route with a device and no gateway.
    #[serde(default)]
    pub scope_link: bool,
    /// The preferred source address (`src`).
    #[serde(default)]
    pub source: Option<std::net::IpAddr>,
}

/// Which streams a process gets from the host. With `terminal`, one stream carries the pty in
/// both directions; otherwise each requested stream is its own vsock connection, and a stream
/// not requested is `/dev/null`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdioConfig {
    pub terminal: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateContainer {
    pub container_id: String,
    /// The bundle's `config.json`. `root.path` is ignored: the root filesystem is `layers`.
    pub spec: Box<Spec>,
    /// Read-only EROFS block devices of the root filesystem, lowest layer first, as guest
    /// device paths (`/dev/vdb`) or `serial:ID` (the virtio-blk serial).
    pub layers: Vec<String>,
    /// The spec's bind mounts whose sources are under [`SHARES_DIR`] are host directories and
    /// files shared over virtio-fs (the runtime has rewritten their sources there and added
    /// the shares to the VM): the agent mounts the [`SHARES_TAG`] file system at
    /// [`SHARES_DIR`], once per guest, before the spec's mounts.
    #[serde(default)]
    pub shares: bool,
    pub stdio: StdioConfig,
    /// The container has the VM to itself (one VM per container): the new UTS and IPC
    /// namespaces its spec asks for are the guest's own, which nothing else uses and which are
    /// as fresh as new ones, and so is the network namespace (see `guest_network`). Making them
    /// would cost seconds of emulated kernel code on a PVM host (a network namespace alone
    /// about 1.5 s, and as much again to tear it down). Ignored when the spec asks for a user
    /// namespace (its root could not manage the guest's).
    #[serde(default)]
    pub owns_guest: bool,
    /// With `owns_guest`: the guest's network namespace is the engine's network, which
    /// `GuestSetup::network` made; the container shares it. Without it such a container shares
    /// it too when it holds nothing but loopback once the spare NICs (a VM restored from a
    /// template has some) are out of sight, whatever its spec says: the engine may configure
    /// the network after the create, which the container then sees, and host networking is
    /// loopback only in a VM. Only when another interface is up there does the container get a
    /// new network namespace with only loopback.
    #[serde(default)]
    pub guest_network: bool,
}

/// The virtio-fs tag of the VM's one file-sharing device, which carries every share.
pub const SHARES_TAG: &str = "cocoon";
/// Where the agent mounts [`SHARES_TAG`]: each share is `SHARES_DIR/<name>`.
pub const SHARES_DIR: &str = "/run/cocoon/fs";

/// The guest path of the share called `name`.
pub fn share_path(name: &str) -> String {
    format!("{SHARES_DIR}/{name}")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecProcess {
    pub container_id: String,
    pub exec_id: String,
    pub process: Box<Process>,
    pub stdio: StdioConfig,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it, when it was killed.
    pub signal: Option<i32>,
    /// Whether the container's cgroup recorded an OOM kill while it ran.
    pub oom_killed: bool,
}

impl ExitStatus {
    /// The shell's convention: the exit code, or 128 + the signal number.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 255,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerStatus {
    Created,
    Running,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerState {
    pub status: ContainerStatus,
    pub pid: i32,
    pub exit: Option<ExitStatus>,
}

/// A container's cgroup figures. `None` limits are `max` (unlimited). The fields after
/// `pids_max` came later: they default, so either side may be older.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStats {
    pub memory_current: u64,
    pub memory_max: Option<u64>,
    pub oom_kills: u64,
    pub cpu_usage_usec: u64,
    pub pids_current: u64,
    pub pids_max: Option<u64>,
    /// cpu.stat `user_usec`.
    #[serde(default)]
    pub cpu_user_usec: u64,
    /// cpu.stat `system_usec`.
    #[serde(default)]
    pub cpu_system_usec: u64,
    /// cpu.stat `nr_periods`, `nr_throttled`, `throttled_usec` (nonzero only under a quota).
    #[serde(default)]
    pub cpu_nr_periods: u64,
    #[serde(default)]
    pub cpu_nr_throttled: u64,
    #[serde(default)]
    pub cpu_throttled_usec: u64,
    /// memory.peak, the highest memory.current seen.
    #[serde(default)]
    pub memory_peak: Option<u64>,
    /// memory.events `max`: how often usage hit memory.max (runc's failcnt).
    #[serde(default)]
    pub memory_max_events: u64,
    /// memory.stat, key by key.
    #[serde(default)]
    pub memory_stat: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request could not be decoded, or was too large.
    BadRequest,
    /// The request's protocol version is not ours.
    Version,
    NotFound,
    AlreadyExists,
    /// The request is well-formed but asks for something invalid.
    InvalidArgument,
    /// The request is valid but not in the current state (e.g. start twice).
    InvalidState,
    Unsupported,
    /// The guest could not do it (a mount or exec failed).
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    pub kind: ErrorKind,
    pub message: String,
}

impl AgentError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> AgentError {
        AgentError {
            kind,
            message: message.into(),
        }
    }
}

/// The first frame on a stdio connection: which process and stream it is for. The agent
/// answers with one frame, `Result<(), AgentError>`, and after an `Ok` the connection carries
/// raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdioAttach {
    pub version: u32,
    pub container_id: String,
    pub exec_id: Option<String>,
    pub stream: StdioStream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StdioStream {
    Stdin,
    Stdout,
    Stderr,
    /// The pty master, both directions.
    Terminal,
}

/// Container and exec ids: what runc accepts, so they are safe as path components and cgroup
/// names.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 1024
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'+'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_escape_a_directory_are_invalid() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "a b",
            "x\0",
            &"a".repeat(1025),
        ] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        for good in ["abc", "a.b-c_d+1", "0123456789abcdef"] {
            assert!(valid_id(good), "{good:?}");
        }
    }

    #[test]
    fn shell_code_follows_128_plus_signal() {
        let killed = ExitStatus {
            code: None,
            signal: Some(9),
            oom_killed: false,
        };
        assert_eq!(killed.shell_code(), 137);
        let exited = ExitStatus {
            code: Some(3),
            signal: None,
            oom_killed: false,
        };
        assert_eq!(exited.shell_code(), 3);
    }

    #[test]
    fn requests_are_tagged_by_method() {
        let json = serde_json::to_value(RequestEnvelope {
            version: PROTOCOL_VERSION,
            id: 7,
            request: Request::StartContainer {
                container_id: "c1".into(),
            },
        })
        .unwrap();
        assert_eq!(json["request"]["method"], "start_container");
        assert_eq!(json["request"]["params"]["container_id"], "c1");
    }

    #[test]
    fn update_carries_the_oci_resources() {
        let json = r#"{"method":"update_resources","params":{"container_id":"c1",
            "resources":{"memory":{"limit":67108864},"pids":{"limit":50}}}}"#;
        let Request::UpdateResources {
            container_id,
            resources,
        } = serde_json::from_str(json).unwrap()
        else {
            panic!("not an update");
        };
        assert_eq!(container_id, "c1");
        assert_eq!(resources.memory().unwrap().limit(), Some(64 << 20));
        assert_eq!(resources.pids().unwrap().limit(), 50);
    }

    #[test]
    fn stats_from_an_older_agent_still_decode() {
        let old = r#"{"memory_current":1,"memory_max":null,"oom_kills":0,"cpu_usage_usec":2,
            "pids_current":1,"pids_max":10}"#;
        let stats: ContainerStats = serde_json::from_str(old).unwrap();
        assert_eq!((stats.cpu_usage_usec, stats.pids_max), (2, Some(10)));
        assert!(stats.memory_stat.is_empty());
    }
}
