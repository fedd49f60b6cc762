//! The container's monitor: holds the container's sandbox (boots the microVM, has the agent
//! create the container), serves the control socket for what only it can do (pause, resume),
//! then stands for the container's init until it exits.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use oci_spec::runtime::ContainerState;

use cocoon_agent_protocol::message::CreateContainer;
use cocoon_runtime::config::Config;
use cocoon_runtime::control::{self, Reply, Request};
use cocoon_runtime::launch::Launch;
use cocoon_runtime::network;
use cocoon_runtime::sandbox::disk_name;
use cocoon_runtime::{Container, Sandbox, SandboxConfig};
use cocoon_runtime::{admission, checkpoint};

use super::{
    SignalSink, Target, block_forwarded_signals, exit_like, record_exit, report, wait_and_forward,
};
use crate::error::CliError;
use crate::hooks::{self, Stage};
use crate::state::{
    CONTROL_SOCKET, EXIT_FILE, PAUSED_FILE, Record, VSOCK_SOCKET, read_record, status,
};
use crate::stdio::Stdio;

/// Runs the container's monitor; never returns. With `start`, the container is started as soon
/// as it is created (`run`), and this process, being the container's process, runs the hooks
/// `create` and `start` would. Without a `report_to` (under `run`), a container that could not
/// be created or started is removed here.
///
/// With `restore_from` (a checkpoint directory), the sandbox is restored from its VM snapshot
/// instead of booted, and the container in it goes on where it was checkpointed.
pub fn run(
    dir: &Path,
    id: &str,
    report_to: Option<UnixStream>,
    start: bool,
    restore_from: Option<&Path>,
) -> ! {
    let set = block_forwarded_signals();
    let mut report_to = report_to;
    let container = crate::cli::container_at(&dir.join(VSOCK_SOCKET), id);
    // Under `run` the record, written before we started, is what the hooks are told.
    let record = match start.then(|| read_record(dir)).transpose() {
        Ok(record) => record,
        Err(e) => {
            report(&mut report_to, &Err::<(), _>(e), || {
                let _ = std::fs::remove_dir_all(dir);
            });
            std::process::exit(1);
        }
    };
    let mut hooks_ran = false;
    let isolated = Launch::read(dir).and_then(|launch| {
        network::unshare_for(&launch.spec)?;
        Ok(network::netns_of(&launch.spec) == network::SpecNetns::New)
    });
    let own_netns = match isolated {
        Ok(own) => own,
        Err(e) => {
            report(&mut report_to, &Err::<(), _>(e), || {
                let _ = std::fs::remove_dir_all(dir);
            });
            std::process::exit(1);
        }
    };
    let opened = match restore_from {
        Some(checkpoint) => open_restored(dir, &container, checkpoint),
        None => open(dir, &container),
    };
    let result = opened.and_then(|(sandbox, stdio)| {
        // A restored container's network came with its checkpoint.
        let held = Held::new(sandbox, dir, id, own_netns && restore_from.is_none());
        if let Some(record) = &record
            && restore_from.is_none()
        {
            hooks_ran = true;
            start_with_hooks(&held, dir, record)?;
        }
        // Served before the verb that spawned us hears of the container: `start` may follow
        // at once and need it (always, when the engine fills our namespace).
        if let Err(e) = held.serve(&dir.join(CONTROL_SOCKET)) {
            if own_netns {
                return Err(CliError::Other(format!(
                    "cannot serve the control socket: {e}"
                )));
            }
            tracing::warn!("no control socket (pause, resume and checkpoint will fail): {e}");
        }
        Ok((held, stdio))
    });
    let go_on = report(&mut report_to, &result, || {
        if hooks_ran {
            // Stopped before its state goes and the poststop hooks run, as `create` does by
            // killing its monitor; the VM itself ends with this process.
            let _ = container.remove();
        }
        let _ = std::fs::remove_dir_all(dir);
        if hooks_ran && let Some(record) = &record {
            crate::cli::create::run_poststop_hooks(record);
        }
    });
    // Not confirmed: `create` died or gave up before recording us. The VM ends with this
    // process; the state directory is left for `delete`, as a killed monitor leaves it.
    let (true, Ok((held, stdio))) = (go_on, result) else {
        std::process::exit(1);
    };
    let target = Target {
        container,
        exec_id: None,
    };
    let status = wait_and_forward(target, stdio, Some(&held.sandbox), held.clone(), set);
    crate::logging::phase("container exited");
    record_exit(&dir.join(EXIT_FILE), &status);
    exit_like(status)
}

/// Under `run`: the prestart and createRuntime hooks (a failure fails the run), the start,
/// then the poststart hooks (a failure is a warning), each told the state at that point.
fn start_with_hooks(held: &Held, dir: &Path, record: &Record) -> Result<(), CliError> {
    let hook_list = record.hooks.as_ref();
    hooks::run(
        hook_list,
        &hooks::CREATE,
        &record.oci_state(ContainerState::Creating),
    )?;
    held.handle(Request::CarryNetwork)?;
    let container = held.sandbox.container(&held.id);
    container.start()?;
    crate::logging::phase("container started");
    let state = record.oci_state(status(dir, record).oci());
    hooks::run_warning(hook_list, Stage::Poststart, &state);
    Ok(())
}

/// The sandbox restored from a checkpoint's VM snapshot, with this container's images as its
/// disks, and the guest re-seeded and told the time. The container's stdio stayed with the
/// checkpointed VM's connections, which the restore reset: it runs detached.
fn open_restored(
    dir: &Path,
    container: &Container,
    checkpoint_dir: &Path,
) -> Result<(Sandbox, Stdio), CliError> {
    let checkpoint = checkpoint::read(checkpoint_dir)?;
    if checkpoint.id != container.id() {
        return Err(CliError::Other(format!(
            "the checkpoint is of container {}: cocoon restores a container under its own id",
            checkpoint.id
        )));
    }
    let launch = Launch::read_for_vm(dir)?;
    if let Some(share) = launch.shares.first() {
        // The checkpointed guest has its mounts; a checkpoint is never of one with shares.
        return Err(CliError::Other(format!(
            "mount {}: a restored container cannot get bind mounts its checkpoint did not have",
            share.destination.display()
        )));
    }
    let network = Network::carry(dir, &launch)?;
    let _turn = admit(&launch)?;
    crate::logging::phase("vm restoring");
    let sandbox = Sandbox::restore(
        &SandboxConfig::for_launch(&launch, container.vsock_socket(), &network.carried.taps),
        &checkpoint::vm_dir(checkpoint_dir),
    )?;
    let hostname = launch
        .spec
        .hostname()
        .clone()
        .unwrap_or_else(|| container.id().chars().take(64).collect());
    // The checkpointed guest has its interfaces configured already.
    sandbox.setup_guest(hostname, Default::default())?;
    crate::logging::phase("identity set");
    network.keep();
    Ok((sandbox, Stdio::detached()))
}

/// Waits for the host to have room for this VM's start (see `admission.rs`).
fn admit(launch: &Launch) -> Result<admission::Ticket, CliError> {
    let policy = admission::Policy::from_config(&Config::load()?);
    let turn = admission::admit(&policy, launch.cpus, launch.memory_mib)?;
    crate::logging::phase("admitted");
    Ok(turn)
}

/// The sandbox booted, the guest named, stdio attached, the container created.
fn open(dir: &Path, container: &Container) -> Result<(Sandbox, Stdio), CliError> {
    let launch = Launch::read_for_vm(dir)?;
    let network = Network::carry(dir, &launch)?;
    // Held until the container is created: that is the start the host must carry.
    let _turn = admit(&launch)?;
    crate::logging::phase("vm starting");
    let sandbox = Sandbox::start(
        &SandboxConfig::for_launch(&launch, container.vsock_socket(), &network.carried.taps),
        &launch.start,
    )?;
    let id = container.id();
    let hostname = launch
        .spec
        .hostname()
        .clone()
        .unwrap_or_else(|| id.chars().take(64).collect());
    sandbox.setup_guest(hostname, network.carried.setup.clone())?;
    crate::logging::phase("identity set");
    sandbox.add_shares(&launch.shares)?;
    let stdio = Stdio::attach(
        container.vsock_socket(),
        id,
        None,
        launch.terminal(),
        launch.console_socket.as_deref(),
    )?;
    // The guest names disks in the order they are given: the layers.
    let layers = (0..launch.images.len()).map(disk_name).collect();
    sandbox.create_container(CreateContainer {
        container_id: id.to_owned(),
        spec: Box::new(launch.spec.clone()),
        layers,
        shares: !launch.shares.is_empty(),
        stdio: stdio.config,
        owns_guest: true,
        guest_network: !network.carried.setup.interfaces.is_empty(),
    })?;
    network.keep();
    crate::logging::phase("container created");
    if let Some((rows, cols)) = stdio.window_size() {
        let _ = container.resize_terminal(None, rows, cols);
    }
    Ok((sandbox, stdio))
}

/// The container's network carried into its VM, undone again unless [`Network::keep`] is
/// called (a monitor that fails to create the container leaves the engine's interfaces as
/// it found them; after `keep`, `delete` undoes it from the record).
struct Network {
    carried: network::Carried,
    kept: bool,
}

impl Network {
    fn carry(dir: &Path, launch: &Launch) -> Result<Network, CliError> {
        let carried = network::carry(&launch.spec)?;
        let network = Network {
            carried,
            kept: false,
        };
        if !network.carried.record.interfaces.is_empty() {
            let json = serde_json::to_vec(&network.carried.record)
                .map_err(|e| CliError::Other(format!("cannot encode the network record: {e}")))?;
            crate::state::write_atomically(&dir.join(network::NETWORK_FILE), &json)?;
        }
        Ok(network)
    }

    fn keep(mut self) {
        self.kept = true;
    }

    /// What the engine has put into the monitor's own namespace since the VM started, given
    /// to the running VM's spare NICs and configured in the guest. No record is written: the
    /// namespace and its interfaces are the engine's to remove, and `delete` could not name it
    /// safely once this process (whose `/proc/PID` names it) is gone.
    fn carry_late(sandbox: &Sandbox) -> Result<(), CliError> {
        let network = Network {
            carried: network::carry_own()?,
            kept: false,
        };
        if network.carried.setup.interfaces.is_empty() {
            return Ok(());
        }
        sandbox.attach_taps(&network.carried.taps)?;
        if let Err(e) = sandbox.configure_network(network.carried.setup.clone()) {
            // The TAPs go with the VMM's fds: nothing of cocoon's stays in the namespace.
            sandbox.detach_taps(network.carried.taps.len());
            return Err(e);
        }
        crate::logging::phase("network carried");
        network.keep();
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        if !self.kept
            && let Err(e) = network::release(&self.carried.record)
        {
            tracing::warn!("{e}");
        }
    }
}

/// Signals (`signal`, `all`) that came while the VM was paused, in order.
type Pending = Vec<(i32, bool)>;

/// The sandbox as the monitor holds it: paused or not, and the signals that came while it was
/// (the guest cannot take them until its vCPUs run again).
#[derive(Clone)]
struct Held {
    sandbox: Arc<Sandbox>,
    /// `Some` while paused.
    paused: Arc<Mutex<Option<Pending>>>,
    /// The container's network is in the monitor's own namespace, filled by the engine after
    /// the VM started, and not carried yet.
    late_network: Arc<Mutex<bool>>,
    marker: PathBuf,
    id: String,
}

impl Held {
    fn new(sandbox: Sandbox, dir: &Path, id: &str, late_network: bool) -> Held {
        Held {
            sandbox: Arc::new(sandbox),
            paused: Arc::new(Mutex::new(None)),
            late_network: Arc::new(Mutex::new(late_network)),
            marker: dir.join(PAUSED_FILE),
            id: id.to_owned(),
        }
    }

    fn serve(&self, socket: &Path) -> std::io::Result<()> {
        let held = self.clone();
        control::serve(socket, move |request| match held.handle(request) {
            Ok(()) => Reply::Done,
            Err(e) => Reply::Refused(e.to_string()),
        })
    }

    fn handle(&self, request: Request) -> Result<(), CliError> {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        match request {
            Request::Pause => {
                if paused.is_none() {
                    self.sandbox.pause()?;
                    crate::state::write_atomically(&self.marker, b"")?;
                    *paused = Some(Vec::new());
                }
                Ok(())
            }
            Request::Resume => {
                let pending = paused.take().ok_or(CliError::NotPaused(self.id.clone()))?;
                self.resume_with(pending)
            }
            Request::CarryNetwork => {
                let mut late = self.late_network.lock().unwrap_or_else(|p| p.into_inner());
                if *late && paused.is_some() {
                    // The agent could not answer: the call would wait with the lock held.
                    return Err(CliError::Other(format!(
                        "container {} is paused: its network cannot be carried",
                        self.id
                    )));
                }
                if *late {
                    Network::carry_late(&self.sandbox)?;
                    *late = false;
                }
                Ok(())
            }
            Request::Checkpoint { dir, leave_running } => {
                // Refused before anything is made or paused.
                self.sandbox.check_snapshot()?;
                // Guest RAM, every secret of the guest: 0700, as runc makes its image path.
                crate::state::create_private_dir_all(&dir).map_err(CliError::io("create", &dir))?;
                self.sandbox.snapshot(&checkpoint::vm_dir(&dir))?;
                checkpoint::write(
                    &dir,
                    &checkpoint::Checkpoint {
                        id: self.id.clone(),
                    },
                )?;
                if !leave_running {
                    // As runc leaves a checkpointed container: stopped. Our wait loop sees
                    // the VM end and exits as killed.
                    self.sandbox.stop();
                } else if paused.is_none() {
                    self.sandbox.resume()?;
                }
                Ok(())
            }
            // As with a frozen cgroup: SIGKILL ends the container at once, others wait.
            Request::Signal { signal, all } => match paused.as_mut() {
                Some(_) if signal == libc::SIGKILL => {
                    let mut pending = paused.take().unwrap_or_default();
                    pending.push((signal, all));
                    self.resume_with(pending)
                }
                Some(pending) => {
                    pending.push((signal, all));
                    Ok(())
                }
                None => self.sandbox.container(&self.id).signal(None, signal, all),
            },
        }
    }

    fn resume_with(&self, pending: Pending) -> Result<(), CliError> {
        self.sandbox.resume()?;
        let _ = std::fs::remove_file(&self.marker);
        let container = self.sandbox.container(&self.id);
        for (signal, all) in pending {
            container.signal(None, signal, all)?;
        }
        Ok(())
    }
}

impl SignalSink for Held {
    fn signal(&self, _target: &Target, signal: i32) {
        if let Err(e) = self.handle(Request::Signal { signal, all: false }) {
            tracing::warn!("cannot pass signal {signal} to the container: {e}");
        }
    }
}
