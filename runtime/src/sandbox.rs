//! A sandbox is one microVM and the agent inside it; a container is a handle on one container
//! the agent runs there. Front ends hold a [`Sandbox`] for as long as the VM lives (the `cocoon`
//! monitor does) and reach its containers through [`Container`] handles, which need only the
//! VM's vsock socket, so other processes can make them too.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cocoon_agent_protocol::client::AgentClient;
use cocoon_agent_protocol::message::{
    ContainerStats, CreateContainer, ExecProcess, ExitStatus, GuestSetup,
};
use cocoon_vmm::config::{ConsoleConfig, DiskConfig, VmConfig, VsockConfig};
use cocoon_vmm::lifecycle::ExitReason;
use cocoon_vmm::snapshot::RestoreConfig;
use cocoon_vmm::vm::Vm;
use oci_spec::runtime::LinuxResources;

use crate::error::Error;
use crate::launch::Launch;

/// The guest context id: each VM has its own vsock device, so every guest can use the same.
const GUEST_CID: u64 = 3;

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
    pub boot_timeout: Duration,
}

impl SandboxConfig {
    /// The sandbox of a container `create` prepared: its layers, then its host files.
    pub fn for_launch(launch: &Launch, vsock_socket: &Path) -> SandboxConfig {
        SandboxConfig {
            kernel: launch.kernel.clone(),
            initrd: launch.initrd.clone(),
            cpus: launch.cpus,
            memory_mib: launch.memory_mib,
            disks: launch
                .images
                .iter()
                .chain(launch.host_files.iter())
                .cloned()
                .collect(),
            vsock_socket: vsock_socket.to_owned(),
            boot_timeout: Duration::from_secs(launch.boot_timeout_secs),
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
            net: None,
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

/// One running microVM with its agent answering.
pub struct Sandbox {
    vm: Arc<Vm>,
    vsock_socket: PathBuf,
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
        };
        sandbox.vm.resume()?;
        crate::phase::phase(phase);
        if let Err(e) = sandbox.wait_for_agent(config.boot_timeout) {
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
        restore.console = Some(ConsoleConfig::Off);
        restore.expect = Some(config.vm_config());
        let vm = Vm::restore(&restore, Instant::now(), SystemTime::now())?;
        Sandbox::run(vm, config, "vm restored")
    }

    /// Saves the VM to `dir` (pausing it first); it stays paused.
    pub fn snapshot(&self, dir: &Path) -> Result<(), Error> {
        self.vm.pause()?;
        Ok(self.vm.snapshot(dir)?)
    }

    fn wait_for_agent(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(reason) = self.vm.try_wait() {
                return Err(Error::EndedWhileBooting(reason));
            }
            if let Ok(mut client) = AgentClient::connect(&self.vsock_socket)
                && client.hello().is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::AgentTimeout(timeout.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A new connection to the agent.
    pub fn agent(&self) -> Result<AgentClient, Error> {
        Ok(AgentClient::connect(&self.vsock_socket)?)
    }

    pub fn vsock_socket(&self) -> &Path {
        &self.vsock_socket
    }

    /// Names the guest, sets its clock to the host's and seeds its entropy pool.
    pub fn setup_guest(&self, hostname: String) -> Result<(), Error> {
        let mut entropy = vec![0u8; 64];
        // SAFETY: getrandom writes at most `entropy.len()` bytes into the buffer it is given.
        unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) };
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.agent()?.setup_guest(GuestSetup {
            hostname: Some(hostname),
            realtime_ns: Some(now.as_nanos() as u64),
            entropy,
        })?;
        Ok(())
    }

    /// Has the agent create a container (stopped before its process execs).
    pub fn create_container(&self, create: CreateContainer) -> Result<Container, Error> {
        let container = self.container(&create.container_id);
        self.agent()?.create_container(create)?;
        Ok(container)
    }

    pub fn container(&self, id: &str) -> Container {
        Container::new(&self.vsock_socket, id)
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
    vsock_socket: PathBuf,
    id: String,
}

impl Container {
    pub fn new(vsock_socket: &Path, id: &str) -> Container {
        Container {
            vsock_socket: vsock_socket.to_owned(),
            id: id.to_owned(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn vsock_socket(&self) -> &Path {
        &self.vsock_socket
    }

    fn agent(&self) -> Result<AgentClient, Error> {
        Ok(AgentClient::connect(&self.vsock_socket)?)
    }

    /// Lets the created container's process exec.
    pub fn start(&self) -> Result<(), Error> {
        self.agent()?.start_container(&self.id)?;
        Ok(())
    }

    /// Starts process `exec.exec_id` in the running container.
    pub fn exec(&self, exec: ExecProcess) -> Result<(), Error> {
        self.agent()?.exec_process(exec)?;
        Ok(())
    }

    /// Blocks until the process (`exec_id` None: the init) exits.
    pub fn wait(&self, exec_id: Option<&str>) -> Result<ExitStatus, Error> {
        Ok(self.agent()?.wait(&self.id, exec_id)?)
    }

    /// Signals the process, or with `all` every process of the container.
    pub fn signal(&self, exec_id: Option<&str>, signal: i32, all: bool) -> Result<(), Error> {
        self.agent()?.signal(&self.id, exec_id, signal, all)?;
        Ok(())
    }

    pub fn resize_terminal(
        &self,
        exec_id: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<(), Error> {
        self.agent()?
            .resize_terminal(&self.id, exec_id, rows, cols)?;
        Ok(())
    }

    /// The guest pids of the container's processes.
    pub fn processes(&self) -> Result<Vec<i32>, Error> {
        Ok(self.agent()?.list_processes(&self.id)?)
    }

    /// Kills what is left of the container and removes it from the guest.
    pub fn remove(&self) -> Result<(), Error> {
        self.agent()?.remove_container(&self.id)?;
        Ok(())
    }

    /// New limits for the container's cgroup in the guest (runc's `update`). What is left out
    /// or zero stays as it is. The VM keeps the vCPUs and memory it booted with, so a limit
    /// above those caps nothing more than they do.
    pub fn update(&self, resources: &LinuxResources) -> Result<(), Error> {
        check_resources(resources)?;
        self.agent()?.update_resources(&self.id, resources)?;
        Ok(())
    }

    /// The figures of the container's cgroup in the guest.
    pub fn stats(&self) -> Result<ContainerStats, Error> {
        Ok(self.agent()?.stats(&self.id)?)
    }
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
