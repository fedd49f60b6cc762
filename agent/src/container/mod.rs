//! Containers inside the guest: what runc does on a host, done by PID 1 of the VM.
//!
//! One file per part of a container's setup: [`rootfs`] (layers and overlay), [`cgroup`],
//! [`mounts`] (inside the new mount namespace), [`process`] (user, capabilities, seccomp,
//! exec), [`spawn`] (how the process comes to exist), all through the [`syscall::Syscall`] trait.

pub mod capabilities;
pub mod cgroup;
pub mod mounts;
pub mod process;
pub mod rootfs;
pub mod seccomp;
pub mod shares;
pub mod spawn;
pub mod syscall;

use std::collections::HashMap;
use std::convert::Infallible;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Process, Spec};

use cocoon_agent_protocol::message::{
    AgentError, ContainerState, ContainerStats, ContainerStatus, CreateContainer, ErrorKind,
    ExecProcess, ExitStatus, valid_id,
};

use crate::reaper::{WaitStatus, reaper};
use crate::stdio::{self, HostStdio};
use cgroup::Cgroup;
use rootfs::Rootfs;
use spawn::{Gate, Namespaces, Spawned};
use syscall::{LinuxSyscall, Syscall};

fn error(kind: ErrorKind, message: impl Into<String>) -> AgentError {
    AgentError::new(kind, message)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One process the agent started (a container's init or an exec), and how it ended.
pub struct ProcessRecord {
    pub pid: i32,
    exit: Mutex<Option<ExitStatus>>,
    exited: Condvar,
    stdio: Mutex<HostStdio>,
}

impl ProcessRecord {
    fn new(pid: i32, stdio: HostStdio) -> Arc<ProcessRecord> {
        Arc::new(ProcessRecord {
            pid,
            exit: Mutex::new(None),
            exited: Condvar::new(),
            stdio: Mutex::new(stdio),
        })
    }

    /// Has the exit recorded when it comes. `oom_before` is the cgroup's OOM kill count when the
    /// process started: more at exit means an OOM kill happened while it ran.
    fn watch(self: &Arc<Self>, cgroup: PathBuf, oom_before: u64) {
        let record = Arc::clone(self);
        reaper().on_exit(self.pid, move |status| {
            let oom_killed = Cgroup { path: cgroup }.oom_kills() > oom_before;
            let exit = match status {
                WaitStatus::Exited(code) => ExitStatus {
                    code: Some(code),
                    signal: None,
                    oom_killed,
                },
                WaitStatus::Signaled(signal) => ExitStatus {
                    code: None,
                    signal: Some(signal),
                    oom_killed,
                },
            };
            *lock(&record.exit) = Some(exit);
            record.exited.notify_all();
        });
    }

    pub fn exit(&self) -> Option<ExitStatus> {
        *lock(&self.exit)
    }

    /// Blocks until the process has exited, or `timeout` passed (then `None`).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<ExitStatus> {
        let mut exit = lock(&self.exit);
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if let Some(status) = *exit {
                return Some(status);
            }
            exit = match deadline {
                None => self.exited.wait(exit).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.checked_duration_since(std::time::Instant::now())?;
                    self.exited
                        .wait_timeout(exit, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    fn signal(&self, signal: i32) -> Result<(), AgentError> {
        if self.exit().is_some() {
            return Err(error(
                ErrorKind::InvalidState,
                "the process has already exited",
            ));
        }
        // SAFETY: kill(2) on a child the agent has not reaped yet, so the pid is still ours.
        if unsafe { libc::kill(self.pid, signal) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(error(
                ErrorKind::Failed,
                format!("kill {} with {signal}: {e}", self.pid),
            ));
        }
        Ok(())
    }

    fn resize(&self, rows: u16, cols: u16) -> Result<(), AgentError> {
        let stdio = lock(&self.stdio);
        let master = stdio
            .pty_master
            .as_ref()
            .ok_or_else(|| error(ErrorKind::InvalidState, "the process has no terminal"))?;
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ on a pty master we hold, with a valid winsize.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(error(
                ErrorKind::Failed,
                format!("resize the terminal: {e}"),
            ));
        }
        Ok(())
    }
}

pub struct Container {
    id: String,
    cgroup: Cgroup,
    rootfs: Mutex<Option<Rootfs>>,
    init: Arc<ProcessRecord>,
    /// The init process between create and start.
    pending: Mutex<Option<Spawned>>,
    execs: Mutex<HashMap<String, Arc<ProcessRecord>>>,
    /// The container's seccomp filter, which exec'd processes get too (as under runc).
    seccomp: Option<process::Seccomp>,
}

impl Container {
    fn status(&self) -> ContainerStatus {
        if self.init.exit().is_some() {
            ContainerStatus::Stopped
        } else if lock(&self.pending).is_some() {
            ContainerStatus::Created
        } else {
            ContainerStatus::Running
        }
    }

    fn process(&self, exec_id: Option<&str>) -> Result<Arc<ProcessRecord>, AgentError> {
        match exec_id {
            None => Ok(Arc::clone(&self.init)),
            Some(exec_id) => lock(&self.execs).get(exec_id).cloned().ok_or_else(|| {
                error(
                    ErrorKind::NotFound,
                    format!("no process {exec_id} in container {}", self.id),
                )
            }),
        }
    }
}

/// Every container in the guest. `None` marks an id whose create is in progress.
#[derive(Default)]
pub struct Containers {
    map: Mutex<HashMap<String, Option<Arc<Container>>>>,
}

/// Namespace kinds as clone flags; the spec's `path`s name the engine's namespaces on the host,
/// which the VM as a whole stands for, so a namespace with a path is the guest's own.
fn new_namespaces(spec: &Spec) -> libc::c_int {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
        .filter(|ns| ns.path().is_none())
        .map(|ns| match ns.typ() {
            LinuxNamespaceType::Mount => libc::CLONE_NEWNS,
            LinuxNamespaceType::Cgroup => libc::CLONE_NEWCGROUP,
            LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
            LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
            LinuxNamespaceType::User => libc::CLONE_NEWUSER,
            LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
            LinuxNamespaceType::Network => libc::CLONE_NEWNET,
            LinuxNamespaceType::Time => 0x80,
        })
        .fold(0, |flags, flag| flags | flag)
}

/// The namespaces among `flags` that a container owning the guest takes from the guest instead
/// of having them made (see `CreateContainer::owns_guest`): UTS and IPC, and the network when
/// it shares the guest's ([`shares_guest_network`]). The init still does in them what it would
/// in new ones (loopback up, hostname), which leaves them as runc would.
fn guest_owned(flags: libc::c_int, owns_guest: bool, shares_network: bool) -> libc::c_int {
    if !owns_guest || flags & libc::CLONE_NEWUSER != 0 {
        return 0;
    }
    let network = if shares_network {
        libc::CLONE_NEWNET
    } else {
        0
    };
    flags & (network | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC)
}

/// Whether a container has the guest's root network namespace as its own: one owning the guest
/// does when the engine's network is there (`guest_network`), and when nothing but loopback is
/// (`foreign_links` false, after the spare NICs of a VM restored from a template were parked),
/// which is what a new namespace would hold, without the 1.3 s of emulated kernel code a new
/// one costs; the engine may still configure its network after `create` (Docker does), which
/// such a container then sees. A link left there (up: another network's) is not this
/// container's to see.
fn shares_guest_network(owns_guest: bool, guest_network: bool, foreign_links: bool) -> bool {
    owns_guest && (guest_network || !foreign_links)
}

/// A container owning the guest that does not share the guest's network namespace gets one of
/// its own (loopback only), even when its spec names the engine's or none (host networking is
/// loopback only in a VM, as with Kata). Costs a namespace made and torn down.
fn network_namespace(flags: libc::c_int, owns_guest: bool, shares_network: bool) -> libc::c_int {
    if owns_guest && !shares_network {
        flags | libc::CLONE_NEWNET
    } else {
        flags
    }
}

/// For a container owning the guest: parks the guest's spare NICs, then says whether anything
/// but loopback is left in its network namespace.
fn guest_has_foreign_links() -> Result<bool, AgentError> {
    let left = crate::nic_park::park_spare().map_err(|e| {
        let e = AgentError::from(e);
        error(
            e.kind,
            format!("hide the guest's spare network devices: {}", e.message),
        )
    })?;
    Ok(!crate::nic_park::only_loopback(&left))
}

fn id_maps(spec: &Spec) -> Option<(String, String)> {
    let linux = spec.linux().as_ref()?;
    let format = |maps: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| {
        maps.iter()
            .flatten()
            .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
            .collect::<String>()
    };
    Some((format(linux.uid_mappings()), format(linux.gid_mappings())))
}

fn privileges(process: &Process, spec: &Spec) -> Result<process::Privileges, AgentError> {
    let last_cap = capabilities::last_cap();
    let seccomp = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        None => None,
        Some(profile) => {
            let invalid = |e: seccomp::SeccompError| {
                error(ErrorKind::InvalidArgument, format!("seccomp: {e}"))
            };
            Some(process::Seccomp {
                program: seccomp::compile(profile).map_err(invalid)?,
                flags: seccomp::filter_flags(profile).map_err(invalid)?,
            })
        }
    };
    Ok(process::Privileges {
        capabilities: capabilities::from_spec(process.capabilities().as_ref(), last_cap),
        last_cap,
        seccomp,
    })
}

/// What runs in a new container's init process, up to exec.
fn init_body(
    sys: &dyn Syscall,
    spec: &Spec,
    process: &Process,
    setup: &mounts::RootfsSetup,
    flags: libc::c_int,
    privileges: &process::Privileges,
    gate: &Gate,
) -> Result<Infallible, String> {
    if flags & libc::CLONE_NEWUSER != 0 {
        gate.wait_for_id_maps();
        // Still the agent's uid 0, which the new namespace does not map: become its root, or
        // every file this process creates on the namespace's own mounts fails with EOVERFLOW.
        sys.setgroups(&[])
            .map_err(|e| format!("setgroups in the user namespace: {e}"))?;
        sys.setresgid(0)
            .map_err(|e| format!("setgid 0 in the user namespace: {e}"))?;
        sys.setresuid(0)
            .map_err(|e| format!("setuid 0 in the user namespace: {e}"))?;
    }
    if flags & libc::CLONE_NEWCGROUP != 0 {
        // Now, not at clone: the namespace's root is the cgroup the process is in.
        sys.unshare(libc::CLONE_NEWCGROUP)
            .map_err(|e| format!("unshare the cgroup namespace: {e}"))?;
    }
    if flags & libc::CLONE_NEWNET != 0 {
        // runc brings a new network namespace's loopback up; programs that talk to themselves
        // over 127.0.0.1 or ::1 rely on it.
        sys.link_up("lo")
            .map_err(|e| format!("bring up lo in the network namespace: {e}"))?;
    }
    mounts::enter_root(sys, spec, setup).map_err(|e| e.to_string())?;
    if flags & libc::CLONE_NEWUTS != 0 {
        if let Some(hostname) = spec.hostname() {
            sys.sethostname(hostname)
                .map_err(|e| format!("sethostname {hostname}: {e}"))?;
        }
        if let Some(domainname) = spec.domainname() {
            sys.setdomainname(domainname)
                .map_err(|e| format!("setdomainname: {e}"))?;
        }
    }
    for (key, value) in spec
        .linux()
        .as_ref()
        .and_then(|l| l.sysctl().as_ref())
        .into_iter()
        .flatten()
    {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        sys.write_file(&path, value.as_bytes())
            .map_err(|e| format!("sysctl {key}: {e}"))?;
    }
    mounts::protect_paths(sys, spec).map_err(|e| e.to_string())?;
    let executable = process::find_executable(process)?;
    gate.ready();
    process::apply(sys, process, privileges).map_err(|e| e.to_string())?;
    let errno = process::exec(&executable, process);
    Err(process::exec_error(&executable, errno))
}

fn exec_body(
    sys: &dyn Syscall,
    process: &Process,
    privileges: &process::Privileges,
    gate: &Gate,
) -> Result<Infallible, String> {
    let executable = process::find_executable(process)?;
    gate.ready();
    process::apply(sys, process, privileges).map_err(|e| e.to_string())?;
    let errno = process::exec(&executable, process);
    Err(process::exec_error(&executable, errno))
}

const NAMESPACE_KINDS: [(&str, libc::c_int); 7] = [
    ("user", libc::CLONE_NEWUSER),
    ("ipc", libc::CLONE_NEWIPC),
    ("uts", libc::CLONE_NEWUTS),
    ("net", libc::CLONE_NEWNET),
    ("pid", libc::CLONE_NEWPID),
    ("cgroup", libc::CLONE_NEWCGROUP),
    ("mnt", libc::CLONE_NEWNS),
];

/// The inode numbers of the agent's own namespaces, in [`NAMESPACE_KINDS`] order (read once:
/// the agent never leaves them; `None` for one the kernel does not show).
fn own_namespaces() -> &'static [Option<u64>; 7] {
    use std::os::unix::fs::MetadataExt;
    static OWN: std::sync::OnceLock<[Option<u64>; 7]> = std::sync::OnceLock::new();
    OWN.get_or_init(|| {
        NAMESPACE_KINDS.map(|(name, _)| {
            std::fs::metadata(format!("/proc/self/ns/{name}"))
                .ok()
                .map(|m| m.ino())
        })
    })
}

/// Opens the namespaces of `pid` that differ from the agent's own.
fn namespaces_of(pid: i32) -> Result<Vec<(OwnedFd, libc::c_int)>, AgentError> {
    use std::os::unix::fs::MetadataExt;
    let mut fds = Vec::new();
    for ((name, kind), own) in NAMESPACE_KINDS.into_iter().zip(own_namespaces()) {
        let theirs = format!("/proc/{pid}/ns/{name}");
        let same = match (std::fs::metadata(&theirs), own) {
            (Ok(a), Some(b)) => a.ino() == *b,
            (Err(e), _) => return Err(error(ErrorKind::Failed, format!("open {theirs}: {e}"))),
            _ => false,
        };
        if !same {
            let file = std::fs::File::open(&theirs)
                .map_err(|e| error(ErrorKind::Failed, format!("open {theirs}: {e}")))?;
            fds.push((OwnedFd::from(file), kind));
        }
    }
    Ok(fds)
}

impl Containers {
    fn get(&self, id: &str) -> Result<Arc<Container>, AgentError> {
        match lock(&self.map).get(id) {
            Some(Some(container)) => Ok(Arc::clone(container)),
            Some(None) => Err(error(
                ErrorKind::InvalidState,
                format!("container {id} is being created"),
            )),
            None => Err(error(
                ErrorKind::NotFound,
                format!("container {id} does not exist"),
            )),
        }
    }

    pub fn create(&self, request: CreateContainer) -> Result<i32, AgentError> {
        let id = request.container_id.clone();
        if !valid_id(&id) {
            return Err(error(
                ErrorKind::InvalidArgument,
                format!("invalid container id {id:?}"),
            ));
        }
        {
            let mut map = lock(&self.map);
            if map.contains_key(&id) {
                return Err(error(
                    ErrorKind::AlreadyExists,
                    format!("container {id} already exists"),
                ));
            }
            map.insert(id.clone(), None);
        }
        let result = create_container(request);
        let mut map = lock(&self.map);
        match result {
            Ok(container) => {
                let pid = container.init.pid;
                map.insert(id, Some(container));
                Ok(pid)
            }
            Err(e) => {
                map.remove(&id);
                Err(e)
            }
        }
    }

    pub fn start(&self, id: &str) -> Result<i32, AgentError> {
        let container = self.get(id)?;
        let pending = lock(&container.pending).take();
        let spawned = pending.ok_or_else(|| {
            error(
                ErrorKind::InvalidState,
                format!("container {id} is not in the created state"),
            )
        })?;
        spawned.start()?;
        Ok(container.init.pid)
    }

    pub fn exec(&self, request: ExecProcess) -> Result<i32, AgentError> {
        let container = self.get(&request.container_id)?;
        if !valid_id(&request.exec_id) {
            return Err(error(
                ErrorKind::InvalidArgument,
                format!("invalid exec id {:?}", request.exec_id),
            ));
        }
        if container.status() != ContainerStatus::Running {
            return Err(error(
                ErrorKind::InvalidState,
                format!("container {} is not running", container.id),
            ));
        }
        if lock(&container.execs).contains_key(&request.exec_id) {
            return Err(error(
                ErrorKind::AlreadyExists,
                format!("process {} already exists", request.exec_id),
            ));
        }
        let process = &request.process;
        let last_cap = capabilities::last_cap();
        let privileges = process::Privileges {
            capabilities: capabilities::from_spec(process.capabilities().as_ref(), last_cap),
            last_cap,
            seccomp: container.seccomp.clone(),
        };
        let namespaces = namespaces_of(container.init.pid)?;
        let (child, mut host) =
            stdio::prepare(&container.id, Some(&request.exec_id), request.stdio)?;
        let oom_before = container.cgroup.oom_kills();
        let sys = LinuxSyscall;
        let spawned = spawn::spawn(
            Namespaces::Join(namespaces),
            &container.cgroup.procs_file(),
            child,
            false,
            |gate| exec_body(&sys, process, &privileges, gate),
        )?;
        let pid = spawned.pid;
        // An execve that fails is the exec's error, as runc's exec reports it, not only the
        // 127 the process then exits with (no one else waits for it: reaped here).
        if let Err(e) = spawned.exec_result() {
            reaper().wait(pid);
            return Err(e);
        }
        host.start_relays();
        let record = ProcessRecord::new(pid, host);
        record.watch(container.cgroup.path.clone(), oom_before);
        lock(&container.execs).insert(request.exec_id, record);
        Ok(pid)
    }

    pub fn signal(
        &self,
        id: &str,
        exec_id: Option<&str>,
        signal: i32,
        all: bool,
    ) -> Result<(), AgentError> {
        let container = self.get(id)?;
        if !(1..=64).contains(&signal) {
            return Err(error(
                ErrorKind::InvalidArgument,
                format!("invalid signal {signal}"),
            ));
        }
        if all {
            for pid in container.cgroup.pids() {
                // SAFETY: kill(2) on pids the container's cgroup lists.
                unsafe { libc::kill(pid, signal) };
            }
            return Ok(());
        }
        container.process(exec_id)?.signal(signal)
    }

    pub fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<ExitStatus, AgentError> {
        let process = self.get(id)?.process(exec_id)?;
        process
            .wait(None)
            .ok_or_else(|| error(ErrorKind::Failed, "wait ended without an exit"))
    }

    pub fn resize(
        &self,
        id: &str,
        exec_id: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<(), AgentError> {
        self.get(id)?.process(exec_id)?.resize(rows, cols)
    }

    pub fn state(&self, id: &str) -> Result<ContainerState, AgentError> {
        let container = self.get(id)?;
        Ok(ContainerState {
            status: container.status(),
            pid: container.init.pid,
            exit: container.init.exit(),
        })
    }

    pub fn stats(&self, id: &str) -> Result<ContainerStats, AgentError> {
        Ok(self.get(id)?.cgroup.stats(&LinuxSyscall))
    }

    /// New limits for a created or running container's cgroup.
    pub fn update(&self, id: &str, resources: &LinuxResources) -> Result<(), AgentError> {
        let container = self.get(id)?;
        if container.status() == ContainerStatus::Stopped {
            return Err(error(
                ErrorKind::InvalidState,
                format!("container {id} is not running"),
            ));
        }
        container
            .cgroup
            .update(&LinuxSyscall, resources)
            .map_err(|e| {
                // The kernel's EINVAL/ERANGE is a value out of its range (a CPU period
                // under 1 ms, say): the caller's mistake, not the guest's failure.
                let kind = match e.errno.0 {
                    libc::EINVAL | libc::ERANGE => ErrorKind::InvalidArgument,
                    _ => ErrorKind::Failed,
                };
                error(kind, e.to_string())
            })
    }

    pub fn processes(&self, id: &str) -> Result<Vec<i32>, AgentError> {
        Ok(self.get(id)?.cgroup.pids())
    }

    /// Kills what is left and removes every trace: processes, mounts, cgroup, streams.
    pub fn remove(&self, id: &str) -> Result<(), AgentError> {
        let container = self.get(id)?;
        let sys = LinuxSyscall;
        // A created container's init is waiting for start; closing its pipe ends it.
        drop(lock(&container.pending).take());
        let _ = container.cgroup.kill_all(&sys);
        let mut records: Vec<Arc<ProcessRecord>> =
            lock(&container.execs).values().cloned().collect();
        records.push(Arc::clone(&container.init));
        for record in &records {
            if record.wait(Some(Duration::from_secs(10))).is_none() {
                return Err(error(
                    ErrorKind::Failed,
                    format!("process {} did not die", record.pid),
                ));
            }
            lock(&record.stdio).close();
        }
        // Both, whatever the other did; the container stays listed until both are gone, so
        // that the engine's next remove tries again what is left.
        let unmounted = unmount_rootfs(&sys, &container.rootfs);
        let cgroup_removed = container
            .cgroup
            .remove(&sys)
            .map_err(|e| error(ErrorKind::Failed, e.to_string()));
        unmounted.and(cgroup_removed)?;
        stdio::discard(id);
        lock(&self.map).remove(id);
        Ok(())
    }
}

/// Unmounts a container's root filesystem. One that stays mounted is an error (the guest
/// would hold it for good), and stays in `slot` for the next remove to try again.
fn unmount_rootfs(sys: &dyn Syscall, slot: &Mutex<Option<Rootfs>>) -> Result<(), AgentError> {
    let mut slot = lock(slot);
    if let Some(rootfs) = slot.as_mut() {
        rootfs
            .unmount(sys)
            .map_err(|e| error(ErrorKind::Failed, e.to_string()))?;
        *slot = None;
    }
    Ok(())
}

fn create_container(request: CreateContainer) -> Result<Arc<Container>, AgentError> {
    let CreateContainer {
        container_id: id,
        spec,
        layers,
        shares,
        stdio: stdio_config,
        owns_guest,
        guest_network,
    } = request;
    let process = spec
        .process()
        .clone()
        .ok_or_else(|| error(ErrorKind::InvalidArgument, "the spec has no process"))?;
    // Before the namespaces are decided: what the guest's network namespace holds once its
    // spare NICs are out of sight says whether the container may share it.
    let foreign_links = owns_guest && guest_has_foreign_links()?;
    let shares_network = shares_guest_network(owns_guest, guest_network, foreign_links);
    // init_body sees the network namespace too, and brings its loopback up.
    let flags = network_namespace(new_namespaces(&spec), owns_guest, shares_network);
    if flags & libc::CLONE_NEWNS == 0 {
        return Err(error(
            ErrorKind::InvalidArgument,
            "the spec must ask for a mount namespace",
        ));
    }
    let terminal = process.terminal() == Some(true);
    if terminal != stdio_config.terminal {
        return Err(error(
            ErrorKind::InvalidArgument,
            "process.terminal and the stdio configuration disagree",
        ));
    }
    let privileges = privileges(&process, &spec)?;
    let devices = layers
        .iter()
        .map(|l| rootfs::layer_device(l))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(ErrorKind::InvalidArgument, e.to_string()))?;

    let sys = LinuxSyscall;
    if shares {
        shares::mount_once(&sys).map_err(|e| error(ErrorKind::Failed, e.to_string()))?;
    }
    let mut rootfs =
        Rootfs::mount(&sys, &id, &devices).map_err(|e| error(ErrorKind::Failed, e.to_string()))?;
    let cgroup = Cgroup::for_container(&id);
    // The create's error, with the root filesystem's if that cannot be unmounted: the engine
    // must learn that the guest holds it.
    let undo = |rootfs: &mut Rootfs, cgroup: &Cgroup, e: AgentError| {
        let unmounted = rootfs.unmount(&sys);
        let _ = cgroup.remove(&sys);
        stdio::discard(&id);
        match unmounted {
            Ok(()) => e,
            Err(left) => error(e.kind, format!("{}; and then {left}", e.message)),
        }
    };
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    if let Err(e) = cgroup.create(&sys, resources) {
        let e = error(ErrorKind::Failed, e.to_string());
        return Err(undo(&mut rootfs, &cgroup, e));
    }
    let prepared = stdio::prepare(&id, None, stdio_config);
    let (child, mut host) = match prepared {
        Ok(pair) => pair,
        Err(e) => return Err(undo(&mut rootfs, &cgroup, e)),
    };
    let console = child.console.clone();
    let setup = mounts::RootfsSetup {
        root: &rootfs.root,
        console: console.as_deref(),
        in_user_namespace: flags & libc::CLONE_NEWUSER != 0,
        cgroup_without_namespace: (flags & libc::CLONE_NEWCGROUP == 0)
            .then_some(cgroup.path.as_path()),
        boot_id: crate::guest::boot_id_file(),
    };
    let namespaces = Namespaces::New {
        clone_flags: flags
            & !libc::CLONE_NEWCGROUP
            & !guest_owned(flags, owns_guest, shares_network),
        id_maps: id_maps(&spec),
    };
    let spawned = spawn::spawn(namespaces, &cgroup.procs_file(), child, true, |gate| {
        init_body(&sys, &spec, &process, &setup, flags, &privileges, gate)
    });
    let spawned = match spawned {
        Ok(spawned) => spawned,
        Err(e) => {
            host.close();
            return Err(undo(&mut rootfs, &cgroup, e));
        }
    };
    host.start_relays();
    let init = ProcessRecord::new(spawned.pid, host);
    init.watch(cgroup.path.clone(), 0);
    Ok(Arc::new(Container {
        id,
        cgroup,
        rootfs: Mutex::new(Some(rootfs)),
        init,
        pending: Mutex::new(Some(spawned)),
        execs: Mutex::new(HashMap::new()),
        seccomp: privileges.seccomp,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_with_a_path_are_the_guests_own() {
        let spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[
                {"type":"pid"},{"type":"mount"},{"type":"network","path":"/var/run/netns/cni-1"},
                {"type":"uts"},{"type":"ipc"},{"type":"cgroup"}]}}"#,
        )
        .unwrap();
        assert_eq!(
            new_namespaces(&spec),
            libc::CLONE_NEWPID
                | libc::CLONE_NEWNS
                | libc::CLONE_NEWUTS
                | libc::CLONE_NEWIPC
                | libc::CLONE_NEWCGROUP
        );
    }

    #[test]
    fn a_container_owning_the_guest_takes_its_net_uts_and_ipc_namespaces() {
        let all = libc::CLONE_NEWPID
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC;
        assert_eq!(
            guest_owned(all, true, true),
            libc::CLONE_NEWNET | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC
        );
        assert_eq!(
            guest_owned(all, true, false),
            libc::CLONE_NEWUTS | libc::CLONE_NEWIPC
        );
        assert_eq!(guest_owned(all, false, true), 0);
        assert_eq!(guest_owned(all | libc::CLONE_NEWUSER, true, true), 0);
        assert_eq!(
            guest_owned(libc::CLONE_NEWNS | libc::CLONE_NEWUTS, true, true),
            libc::CLONE_NEWUTS
        );
    }

    #[test]
    fn a_guest_owning_container_not_sharing_the_guests_network_gets_its_own() {
        // The spec names the engine's namespace (a path) or none at all (host networking).
        let flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID;
        let net = network_namespace(flags, true, false);
        assert_eq!(net, flags | libc::CLONE_NEWNET);
        assert_eq!(
            guest_owned(net, true, false) & libc::CLONE_NEWNET,
            0,
            "made, not shared"
        );
        assert_eq!(network_namespace(flags, true, true), flags);
        assert_eq!(network_namespace(flags, false, false), flags);
        let with_net = flags | libc::CLONE_NEWNET;
        assert_eq!(
            guest_owned(network_namespace(with_net, true, true), true, true),
            libc::CLONE_NEWNET
        );
    }

    #[test]
    fn the_guests_network_is_shared_unless_another_network_is_there() {
        // (owns_guest, guest_network, foreign_links) -> shares
        for (owns, network, foreign, shares) in [
            (true, true, false, true),
            (true, true, true, true),
            // No network for it, and loopback alone left once the spare NICs are parked.
            (true, false, false, true),
            // An interface up that the engine did not give this container.
            (true, false, true, false),
            (false, true, false, false),
            (false, false, false, false),
        ] {
            assert_eq!(
                shares_guest_network(owns, network, foreign),
                shares,
                "{owns} {network} {foreign}"
            );
        }
        // Shared: a spec asking for a new one (or naming the engine's) makes none.
        let flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWNET;
        let shares = shares_guest_network(true, false, false);
        let made = network_namespace(flags, true, shares) & !guest_owned(flags, true, shares);
        assert_eq!(made & libc::CLONE_NEWNET, 0);
    }

    #[test]
    fn a_root_filesystem_left_mounted_fails_the_remove_and_stays_for_the_next() {
        use syscall::recorder::Recorder;
        let mut sys = Recorder::default();
        let rootfs = Rootfs::mount(&sys, "c1", &[PathBuf::from("/dev/vdb")]).unwrap();
        let slot = Mutex::new(Some(rootfs));
        sys.failing
            .insert("umount /run/cocoon/containers/c1".into());
        let e = unmount_rootfs(&sys, &slot).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Failed);
        assert!(
            e.message.starts_with(
                "the root filesystem under /run/cocoon/containers/c1 is still mounted"
            ),
            "{}",
            e.message
        );
        assert!(lock(&slot).is_some(), "kept for another try");

        sys.failing.clear();
        unmount_rootfs(&sys, &slot).unwrap();
        assert!(lock(&slot).is_none());
        assert!(sys.mounts.borrow().is_empty(), "{:?}", sys.mounts);
        // Nothing left to unmount: a remove that comes again is not an error.
        unmount_rootfs(&sys, &slot).unwrap();
    }

    #[test]
    fn id_maps_use_the_proc_format() {
        let spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{
                "uidMappings":[{"containerID":0,"hostID":1000,"size":1}],
                "gidMappings":[{"containerID":0,"hostID":100,"size":10}]}}"#,
        )
        .unwrap();
        assert_eq!(
            id_maps(&spec),
            Some(("0 1000 1\n".into(), "0 100 10\n".into()))
        );
    }
}
