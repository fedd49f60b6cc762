//! A sandbox is one microVM and the agent inside it; a container is a handle on one container
//! the agent runs there. Front ends hold a [`Sandbox`] for as long as the VM lives (the `cocoon`
//! monitor does) and reach its containers through [`Container`] handles, which need only the
//! VM's vsock socket, so other processes can make them too.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use cocoon_agent_protocol::client::{AgentClient, ClientError, Patience};
use cocoon_agent_protocol::message::{
    ContainerStats, CreateContainer, ExecProcess, ExitStatus, GuestCounters, GuestSetup,
    NetworkSetup, SHARES_TAG,
};
use cocoon_vmm::config::{
    ConsoleConfig, DiskConfig, FsConfig, NetConfig, TapSource, VmConfig, VsockConfig,
};
use cocoon_vmm::devices::virtio::fs::Share;
use cocoon_vmm::lifecycle::ExitReason;
use cocoon_vmm::snapshot::RestoreConfig;
use cocoon_vmm::vm::Vm;
use oci_spec::runtime::LinuxResources;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::launch::Launch;
use crate::progress::{GuestLimits, Probe, Watch};
use crate::shares::HostShare;
use crate::template::{Template, TemplateSpec, Templates};

/// How a sandbox's VM comes up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartPlan {
    /// Restored from a template in this directory of templates (made there first if needed).
    Template { dir: PathBuf },
    /// Booted, for this reason.
    Cold { reason: String },
}

/// The guest context id: each VM has its own vsock device, so every guest can use the same.
const GUEST_CID: u64 = 3;
/// How long one hello may take while waiting for the agent. A loaded guest answers in a couple
/// of seconds; one that has not after this long is asked again on a new connection (a
/// restored guest may have reset the first one under its agent).
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the wait for an agent that has not marked itself up knocks all the same.
const UNMARKED_KNOCK: Duration = Duration::from_secs(5);

/// What one sandbox's VM is made of.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cpus: u8,
    pub memory_mib: u64,
    /// Read-only disks, in the order the guest names them (`/dev/vda`, `/dev/vdb`, ...).
    pub disks: Vec<PathBuf>,
    /// The VMM's host-side vsock socket.
    pub vsock_socket: PathBuf,
    /// How long waits on the guest go on without progress.
    pub limits: GuestLimits,
    /// The TAPs of the VM's NICs, in order (see `network::carry`).
    pub taps: Vec<Arc<OwnedFd>>,
    /// How many NICs the VM has: one per TAP, and detached ones after them (a template's
    /// spare, which clones attach their TAPs to).
    pub nic_slots: usize,
}

impl SandboxConfig {
    /// The sandbox of a container `create` prepared: its layers as disks (its host files are
    /// shared once it runs: [`Sandbox::add_shares`]).
    pub fn for_launch(
        launch: &Launch,
        vsock_socket: &Path,
        taps: &[Arc<OwnedFd>],
    ) -> SandboxConfig {
        SandboxConfig {
            kernel: launch.kernel.clone(),
            initrd: launch.initrd.clone(),
            cpus: launch.cpus,
            memory_mib: launch.memory_mib,
            disks: launch.images.clone(),
            vsock_socket: vsock_socket.to_owned(),
            limits: launch.guest_limits,
            taps: taps.to_vec(),
            // A new, empty namespace may get the engine's interfaces after `create` (Docker's
            // prestart hook puts them there): a cold-booted VM keeps a NIC for them.
            nic_slots: match crate::network::netns_of(&launch.spec) {
                crate::network::SpecNetns::New => taps.len().max(1),
                _ => taps.len(),
            },
        }
    }

    /// NIC `slot` on its TAP, or detached when it has none.
    fn nic(&self, slot: usize) -> NetConfig {
        NetConfig {
            tap: self
                .taps
                .get(slot)
                .map_or(TapSource::Detached, |tap| TapSource::Fd(tap.as_raw_fd())),
            mac: crate::network::nic_mac(slot),
        }
    }

    fn vm_config(&self) -> VmConfig {
        VmConfig {
            kernel: self.kernel.clone(),
            initrd: Some(self.initrd.clone()),
            cmdline: None,
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            disks: self
                .disks
                .iter()
                .map(|path| DiskConfig {
                    path: path.clone(),
                    read_only: true,
                })
                .collect(),
            rng: false,
            vsock: Some(VsockConfig {
                cid: GUEST_CID,
                uds: self.vsock_socket.clone(),
            }),
            // Every VM has the file server, without shares until a container's are added: a
            // template's clones get theirs after the restore.
            fs: Some(FsConfig {
                tag: SHARES_TAG.into(),
                shares: Vec::new(),
            }),
            nets: (0..self.nic_slots.max(self.taps.len()))
                .map(|slot| self.nic(slot))
                .collect(),
            console: ConsoleConfig::Off,
        }
    }
}

/// The guest's name for the disk at `index` of [`SandboxConfig::disks`].
pub fn disk_name(index: usize) -> String {
    let letter = u8::try_from(index)
        .ok()
        .and_then(|i| b'a'.checked_add(i))
        .filter(u8::is_ascii_lowercase)
        .unwrap_or(b'z');
    format!("/dev/vd{}", letter as char)
}

/// A connection to the agent kept for the requests that answer at once. Each new vsock
/// connection costs the guest a socket, a thread and an accept in emulated kernel code (about
/// 0.2 s on a PVM host), so a container's start path asks everything over one. Requests on it
/// take turns; `wait`, which blocks until a process exits, has a connection of its own.
#[derive(Clone)]
struct Channel {
    vsock_socket: PathBuf,
    client: Arc<Mutex<Option<AgentClient>>>,
    /// A reply is awaited for as long as the guest makes progress by these limits...
    limits: GuestLimits,
    /// ...or, when set, for this long (a verb with a quicker way out).
    timeout: Option<Duration>,
}

/// A request that answers at once (all but `wait`) is awaited for as long as the guest makes
/// progress (an agent that never answers fails it instead of holding the caller, and the
/// others queued behind it on the connection, for ever). Once its reply begins to arrive, or
/// while it is written, each read or write may take this long: a frame comes whole unless the
/// guest is hostile.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(60);

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("vsock_socket", &self.vsock_socket)
            .finish_non_exhaustive()
    }
}

impl Channel {
    fn new(vsock_socket: &Path, limits: GuestLimits) -> Channel {
        Channel {
            vsock_socket: vsock_socket.to_owned(),
            client: Arc::new(Mutex::new(None)),
            limits,
            timeout: None,
        }
    }

    /// How this call waits for its reply: the handle's timeout, or the guest's progress (its
    /// VMM is the process serving the socket). Without the VMM's pid, the frame timeout.
    fn pace(&self, client: &mut AgentClient) -> std::io::Result<()> {
        let patience = match self.timeout {
            Some(_) => None,
            None => client.vmm_pid().map(|pid| {
                let mut watch = Watch::new(Probe::of_process(pid), self.limits);
                Box::new(move || watch.check().map_err(|stuck| stuck.to_string())) as Patience
            }),
        };
        client.set_patience(patience);
        client.set_timeout(Some(self.timeout.unwrap_or(FRAME_TIMEOUT)))
    }

    /// Runs `request` on the kept connection (made first if there is none). A connection that
    /// failed is dropped, so the next request makes a new one; an error the agent replied with
    /// leaves it usable.
    fn call<T>(
        &self,
        request: impl FnOnce(&mut AgentClient) -> Result<T, ClientError>,
    ) -> Result<T, Error> {
        let mut kept = self.client.lock().unwrap_or_else(|p| p.into_inner());
        let mut client = match kept.take() {
            Some(client) => client,
            None => AgentClient::connect_within(&self.vsock_socket, self.timeout)?,
        };
        self.pace(&mut client)
            .map_err(Error::io("set a timeout on", &self.vsock_socket))?;
        let result = request(&mut client);
        if matches!(result, Ok(_) | Err(ClientError::Agent(_))) {
            *kept = Some(client);
        }
        Ok(result?)
    }

    fn keep(&self, client: AgentClient) {
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(client);
    }
}

/// One running microVM with its agent answering.
pub struct Sandbox {
    vm: Arc<Vm>,
    vsock_socket: PathBuf,
    channel: Channel,
    /// Host files shared with the guest so far.
    shared: std::sync::atomic::AtomicUsize,
}

impl Sandbox {
    /// Builds the VM, runs it, and waits until the agent answers. On error the VM is stopped.
    pub fn boot(config: &SandboxConfig) -> Result<Sandbox, Error> {
        let vm = Vm::build(&config.vm_config(), Instant::now(), SystemTime::now())?;
        Sandbox::run(vm, config, "vm running")
    }

    /// Resumes a built or restored VM and waits for its agent; on error the VM is stopped.
    fn run(vm: Vm, config: &SandboxConfig, phase: &str) -> Result<Sandbox, Error> {
        let sandbox = Sandbox {
            vm: Arc::new(vm),
            vsock_socket: config.vsock_socket.clone(),
            channel: Channel::new(&config.vsock_socket, config.limits),
            shared: Default::default(),
        };
        sandbox.vm.resume()?;
        crate::phase::phase(phase);
        if let Err(e) = sandbox.wait_for_agent(config.limits) {
            sandbox.vm.stop();
            return Err(e);
        }
        crate::phase::phase("agent up");
        Ok(sandbox)
    }

    /// Restores the VM saved in `snapshot` (see [`Sandbox::snapshot`]) with this config's
    /// vsock socket and disks (in order, replacing the snapshot's first ones), runs it and
    /// waits for the agent. The snapshot must be of the same kernel and initramfs. The guest is
    /// the snapshotted one: the caller re-seeds and re-times it (`setup_guest`).
    pub fn restore(config: &SandboxConfig, snapshot: &Path) -> Result<Sandbox, Error> {
        let mut restore = RestoreConfig::new(snapshot);
        restore.overrides.vsock_uds = Some(config.vsock_socket.clone());
        restore.overrides.disks = config
            .disks
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let disk = DiskConfig {
                    path: path.clone(),
                    read_only: true,
                };
                (format!("block{i}"), disk)
            })
            .collect();
        restore.overrides.nets = (0..config.taps.len())
            .map(|slot| (format!("net{slot}"), config.nic(slot)))
            .collect();
        restore.console = Some(ConsoleConfig::Off);
        restore.expect = Some(config.vm_config());
        let vm = Vm::restore(&restore, Instant::now(), SystemTime::now())?;
        Sandbox::run(vm, config, "vm restored")
    }

    /// Starts the sandbox as `plan` says: restored from its template (made first if there is
    /// none; one that fails to load is removed and made again, once), or booted.
    pub fn start(config: &SandboxConfig, plan: &StartPlan) -> Result<Sandbox, Error> {
        let templates = match plan {
            StartPlan::Cold { reason } => {
                tracing::info!("booting the microVM cold: {reason}");
                return Sandbox::boot(config);
            }
            StartPlan::Template { dir } => Templates::new(dir),
        };
        let spec = TemplateSpec::for_sandbox(config)?;
        let mut retried = false;
        loop {
            let template = templates.ensure(&spec, config.limits)?;
            crate::phase::phase("template ready");
            match Sandbox::from_template(config, &template) {
                Err(e) if !retried && e.is_load_failure() => {
                    templates.discard(&template, &e);
                    retried = true;
                }
                result => return result,
            }
        }
    }

    /// Restores `template` with this config's vsock socket and its disks in the first slots.
    fn from_template(config: &SandboxConfig, template: &Template) -> Result<Sandbox, Error> {
        let slots = template.slots();
        if config.disks.len() > slots.len() {
            return Err(Error::Other(format!(
                "{} disks do not fit the template's {} slots",
                config.disks.len(),
                slots.len()
            )));
        }
        // The container's own images, opened first: one that is missing is the container's
        // error, not a reason to throw the template away.
        for disk in &config.disks {
            std::fs::File::open(disk).map_err(Error::io("open", disk))?;
        }
        if config.taps.len() > template.nics() {
            return Err(Error::Other(format!(
                "{} NICs do not fit the template's {}",
                config.taps.len(),
                template.nics()
            )));
        }
        let mut filled = config.clone();
        filled
            .disks
            .extend(slots.into_iter().skip(config.disks.len()));
        filled.nic_slots = template.nics();
        Sandbox::restore(&filled, &template.snapshot_dir())
    }

    /// Saves the VM to `dir` (pausing it first); it stays paused. A VM with host files shared
    /// is refused before it is paused: the file server's open files cannot be saved.
    pub fn snapshot(&self, dir: &Path) -> Result<(), Error> {
        self.check_snapshot()?;
        self.vm.pause()?;
        Ok(self.vm.snapshot(dir)?)
    }

    /// Whether the VM can be saved: not once host files are shared with it.
    pub fn check_snapshot(&self) -> Result<(), Error> {
        if self.shared.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            return Err(Error::Other(
                "the container has host files bind-mounted (shared with its microVM over \
                 virtio-fs), which a checkpoint cannot carry: run it without bind mounts to \
                 checkpoint it"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Waits for the agent's first answer for as long as the guest makes progress (this
    /// process is its VMM): a slow boot on a loaded host completes, a stuck one ends.
    fn wait_for_agent(&self, limits: GuestLimits) -> Result<(), Error> {
        let started = Instant::now();
        let mut watch = Watch::new(Probe::of_process(std::process::id() as i32), limits);
        let mut last_knock = Duration::ZERO;
        loop {
            if let Some(reason) = self.vm.try_wait() {
                return Err(Error::EndedWhileBooting(reason));
            }
            watch.check().map_err(Error::GuestStuck)?;
            // The agent marks itself up (the guest status page) as it starts to listen; until
            // then a knock would only make the guest refuse it, in emulated kernel code that
            // passes for progress. A knock now and then all the same, should the mark be lost.
            let marked = self.vm.lifecycle().agent_up().is_some();
            let knock = marked || started.elapsed() >= last_knock + UNMARKED_KNOCK;
            if knock && let Ok(mut client) = AgentClient::connect(&self.vsock_socket) {
                // An agent that took the connection but does not answer gets a new one.
                let bounded = client.set_timeout(Some(HELLO_TIMEOUT));
                if bounded.is_ok() && client.hello().is_ok() {
                    self.channel.keep(client);
                    return Ok(());
                }
            }
            if knock {
                last_knock = started.elapsed();
            }
            // A restored agent answers the first knock; a booting one that has marked itself
            // up listens soon after, and each refused knock costs it work.
            let pause = if marked { 200 } else { 20 };
            std::thread::sleep(Duration::from_millis(pause));
        }
    }

    pub fn vsock_socket(&self) -> &Path {
        &self.vsock_socket
    }

    /// Gives the guest its own identity before any container code runs in it: its name, the
    /// host's clock, fresh entropy (credited, and the CRNG reseeded from it) and a boot id of
    /// its own for containers to read. A VM restored from a template shares all of these with
    /// its siblings until this call.
    /// With `network`, the guest's NICs are given the engine's interfaces' names, MACs,
    /// addresses and routes.
    pub fn setup_guest(&self, hostname: String, network: NetworkSetup) -> Result<(), Error> {
        let entropy = random_bytes::<64>()?.to_vec();
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let setup = GuestSetup {
            hostname: Some(hostname),
            realtime_ns: Some(now.as_nanos() as u64),
            entropy,
            boot_id: Some(uuid_v4(random_bytes::<16>()?)),
            network,
        };
        self.call(|agent| agent.setup_guest(setup))
    }

    /// Configures the guest's network alone (nothing else of its identity changes): the NICs
    /// named in `network` get the engine's interfaces, and the agent hides the NICs it does
    /// not name, so a container without a network sees loopback only. A template is saved
    /// after an empty one; a late network (made after `create`) comes this way too.
    pub fn configure_network(&self, network: NetworkSetup) -> Result<(), Error> {
        let setup = GuestSetup {
            network,
            ..GuestSetup::default()
        };
        self.call(|agent| agent.setup_guest(setup))
    }

    /// Gives the VM's NICs, from the first, these TAPs as their host sides, while it runs
    /// (NICs of a template were saved without one). All or nothing: on a failure the NICs
    /// attached so far are detached again.
    pub fn attach_taps(&self, taps: &[Arc<OwnedFd>]) -> Result<(), Error> {
        let nics = self.vm.config().nets.len();
        if taps.len() > nics {
            return Err(Error::Other(format!(
                "the engine gave the container {} network interfaces; its microVM has {nics} \
                 NICs (`cocoon template create --nics N` makes templates with more)",
                taps.len()
            )));
        }
        for (slot, tap) in taps.iter().enumerate() {
            if let Err(e) = self
                .vm
                .attach_tap(&format!("net{slot}"), TapSource::Fd(tap.as_raw_fd()))
            {
                self.detach_taps(slot);
                return Err(Error::Other(format!("cannot give NIC {slot} its TAP: {e}")));
            }
        }
        Ok(())
    }

    /// Takes the first `count` NICs' host sides away (the VMM closes its TAP fds).
    pub fn detach_taps(&self, count: usize) {
        for slot in 0..count {
            let _ = self
                .vm
                .attach_tap(&format!("net{slot}"), TapSource::Detached);
        }
    }

    /// Shares these host files with the guest (the VM's file server serves them by name);
    /// the container whose spec names them may then be created. Each source is opened again
    /// and checked to be the file `create` saw.
    pub fn add_shares(&self, shares: &[HostShare]) -> Result<(), Error> {
        for share in shares {
            let root = share.open()?;
            let share = Share {
                name: share.name.clone(),
                root,
                read_only: share.read_only,
            };
            self.vm
                .add_share("fs0", share)
                .map_err(|e| Error::Other(format!("cannot share a host file with the VM: {e}")))?;
        }
        self.shared
            .fetch_add(shares.len(), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Has the agent create a container (stopped before its process execs).
    pub fn create_container(&self, create: CreateContainer) -> Result<Container, Error> {
        let container = self.container(&create.container_id);
        self.call(|agent| agent.create_container(create))?;
        Ok(container)
    }

    /// A request on the kept connection; when it fails because the VM ended (the VMM closes
    /// its clients' connections then), the error says so.
    fn call<T>(
        &self,
        request: impl FnOnce(&mut AgentClient) -> Result<T, ClientError>,
    ) -> Result<T, Error> {
        self.channel
            .call(request)
            .map_err(|e| match self.vm.try_wait() {
                Some(reason) if !matches!(e, Error::Agent(ClientError::Agent(_))) => {
                    Error::VmEnded(reason)
                }
                _ => e,
            })
    }

    /// A handle on container `id` that shares the sandbox's connection to the agent.
    pub fn container(&self, id: &str) -> Container {
        Container {
            channel: self.channel.clone(),
            id: id.to_owned(),
        }
    }

    /// What the guest has spent so far (forks, page faults, CPU time).
    pub fn counters(&self) -> Result<GuestCounters, Error> {
        self.call(|agent| agent.counters())
    }

    /// Stops the vCPUs: everything in the guest stands still until [`Sandbox::resume`].
    pub fn pause(&self) -> Result<(), Error> {
        Ok(self.vm.pause()?)
    }

    pub fn resume(&self) -> Result<(), Error> {
        Ok(self.vm.resume()?)
    }

    /// Why the VM ended, once it has.
    pub fn ended(&self) -> Option<ExitReason> {
        self.vm.try_wait()
    }

    /// Ends the VM and everything in it.
    pub fn stop(&self) {
        self.vm.stop();
    }
}

/// A container in a sandbox, reached through the VM's vsock socket.
#[derive(Debug, Clone)]
pub struct Container {
    channel: Channel,
    id: String,
}

impl Container {
    /// A handle of its own (another process than the sandbox's holder, say).
    pub fn new(vsock_socket: &Path, id: &str) -> Container {
        Container {
            channel: Channel::new(vsock_socket, GuestLimits::default()),
            id: id.to_owned(),
        }
    }

    /// The same handle with replies awaited as long as the guest makes progress by `limits`
    /// (the defaults unless set).
    pub fn with_limits(mut self, limits: GuestLimits) -> Container {
        self.channel.limits = limits;
        self
    }

    /// The same handle with requests bounded by `timeout`, whatever the guest's progress (a
    /// verb that has a quicker way out when the guest does not answer).
    pub fn with_timeout(mut self, timeout: Duration) -> Container {
        self.channel.timeout = Some(timeout);
        self
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn vsock_socket(&self) -> &Path {
        &self.channel.vsock_socket
    }

    /// Lets the created container's process exec.
    pub fn start(&self) -> Result<(), Error> {
        self.channel
            .call(|agent| agent.start_container(&self.id))
            .map(drop)
    }

    /// Starts process `exec.exec_id` in the running container.
    pub fn exec(&self, exec: ExecProcess) -> Result<(), Error> {
        self.channel
            .call(|agent| agent.exec_process(exec))
            .map(drop)
    }

    /// Blocks until the process (`exec_id` None: the init) exits.
    pub fn wait(&self, exec_id: Option<&str>) -> Result<ExitStatus, Error> {
        Ok(AgentClient::connect(self.vsock_socket())?.wait(&self.id, exec_id)?)
    }

    /// Signals the process, or with `all` every process of the container.
    pub fn signal(&self, exec_id: Option<&str>, signal: i32, all: bool) -> Result<(), Error> {
        self.channel
            .call(|agent| agent.signal(&self.id, exec_id, signal, all))
    }

    pub fn resize_terminal(
        &self,
        exec_id: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<(), Error> {
        self.channel
            .call(|agent| agent.resize_terminal(&self.id, exec_id, rows, cols))
    }

    /// The guest pids of the container's processes.
    pub fn processes(&self) -> Result<Vec<i32>, Error> {
        self.channel.call(|agent| agent.list_processes(&self.id))
    }

    /// Kills what is left of the container and removes it from the guest.
    pub fn remove(&self) -> Result<(), Error> {
        self.channel.call(|agent| agent.remove_container(&self.id))
    }

    /// New limits for the container's cgroup in the guest (runc's `update`). What is left out
    /// or zero stays as it is. The VM keeps the vCPUs and memory it booted with, so a limit
    /// above those caps nothing more than they do.
    pub fn update(&self, resources: &LinuxResources) -> Result<(), Error> {
        check_resources(resources)?;
        self.channel
            .call(|agent| agent.update_resources(&self.id, resources))
    }

    /// The figures of the container's cgroup in the guest.
    pub fn stats(&self) -> Result<ContainerStats, Error> {
        self.channel.call(|agent| agent.stats(&self.id))
    }
}

/// `N` bytes from the host's CSPRNG.
fn random_bytes<const N: usize>() -> Result<[u8; N], Error> {
    let mut bytes = [0u8; N];
    // SAFETY: getrandom writes at most `N` bytes into the buffer it is given.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), N, 0) };
    if got != N as isize {
        return Err(Error::Other(format!(
            "getrandom: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(bytes)
}

/// A random (version 4) UUID in the kernel's boot_id form.
fn uuid_v4(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Refuses what the guest's cgroup would misread: memory sizes are bytes or -1 (unlimited),
/// as runc takes them; the kernel checks the rest (a CPU period's range, say) itself.
fn check_resources(resources: &LinuxResources) -> Result<(), Error> {
    if let Some(memory) = resources.memory() {
        for (name, value) in [
            ("memory.limit", memory.limit()),
            ("memory.reservation", memory.reservation()),
            ("memory.swap", memory.swap()),
        ] {
            if let Some(value) = value.filter(|v| *v < -1) {
                return Err(Error::InvalidResources(format!(
                    "{name} {value}: want a size in bytes, or -1 for unlimited"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn boot_ids_look_like_the_kernels() {
        let id = uuid_v4([0xff; 16]);
        assert_eq!(id, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        let a = uuid_v4(random_bytes().unwrap());
        let b = uuid_v4(random_bytes().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
    }

    /// A guest that takes connections and reads requests but never answers: each call fails
    /// once the handle's timeout is up, and the next one comes on a new connection.
    #[test]
    fn a_silent_agent_fails_the_call_and_frees_the_connection() {
        use std::io::{BufRead, Write};
        let dir = std::env::temp_dir().join(format!("cocoon-silent-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut line = String::new();
                std::io::BufReader::new(&stream)
                    .read_line(&mut line)
                    .unwrap();
                stream.write_all(b"OK 1024\n").unwrap();
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(stream); // never answered, never closed
            }
        });
        let container = Container::new(&socket, "c1").with_timeout(Duration::from_millis(200));
        for attempt in 1..=2 {
            let started = Instant::now();
            assert!(container.signal(None, libc::SIGTERM, false).is_err());
            assert!(started.elapsed() < Duration::from_secs(5));
            assert_eq!(
                accepted.load(std::sync::atomic::Ordering::SeqCst),
                attempt,
                "a new connection for each call"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A guest that never accepts the connection (the VMM holds it pending): a call with a
    /// timeout fails in that time, as `kill ID KILL` relies on.
    #[test]
    fn a_connection_the_guest_never_accepts_fails_in_time() {
        let dir = std::env::temp_dir().join(format!("cocoon-pending-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let (accepted, was_accepted) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Accept, then read nothing, answer nothing, close nothing: the CONNECT handshake
            // stays pending as it does in a guest whose vsock driver is not up.
            let mut held = Vec::new();
            for stream in listener.incoming() {
                held.push(stream);
                let _ = accepted.send(());
            }
        });
        let container = Container::new(&socket, "c1").with_timeout(Duration::from_millis(200));
        let started = Instant::now();
        assert!(container.signal(None, libc::SIGKILL, false).is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
        // The call failed on the pending handshake, not on a refused connection.
        assert!(was_accepted.try_recv().is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn memory_sizes_below_minus_one_are_refused() {
        assert!(check_resources(&resources(r#"{"memory":{"limit":-1,"swap":0}}"#)).is_ok());
        assert!(check_resources(&resources(r#"{"pids":{"limit":-5}}"#)).is_ok());
        let err = check_resources(&resources(r#"{"memory":{"reservation":-2}}"#)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid resources: memory.reservation -2: want a size in bytes, or -1 for unlimited"
        );
    }
}
