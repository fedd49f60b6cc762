//! The container's monitor: boots the microVM, has the agent create the container, then stands
//! for the container's init until it exits.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use oci_spec::runtime::{ContainerState, Spec};
use serde::{Deserialize, Serialize};

use cocoon_agent_protocol::client::AgentClient;
use cocoon_agent_protocol::message::{CreateContainer, GuestSetup};
use cocoon_vmm::builder;
use cocoon_vmm::config::{ConsoleConfig, DiskConfig, VmConfig, VsockConfig};

use super::stdio::Stdio;
use super::{Target, block_forwarded_signals, exit_like, record_exit, report, wait_and_forward};
use crate::hooks::{self, Stage};
use crate::state::{EXIT_FILE, Record, VSOCK_SOCKET, read_record, status};

pub const LAUNCH_FILE: &str = "launch.json";

/// Everything the monitor needs, written by `create` before it starts the monitor.
#[derive(Debug, Serialize, Deserialize)]
pub struct Launch {
    pub spec: Spec,
    pub images: Vec<PathBuf>,
    /// The image of the host files the spec bind-mounts (see host_files.rs).
    pub host_files: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    pub cpus: u8,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub boot_timeout_secs: u64,
}

pub fn read_launch(dir: &Path) -> Result<Launch, String> {
    let path = dir.join(LAUNCH_FILE);
    std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_slice(&t).map_err(|e| e.to_string()))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Runs the container's monitor; never returns. With `start`, the container is started as soon
/// as it is created (`run`), and this process, being the container's process, runs the hooks
/// `create` and `start` would. Without a `report_to` (under `run`), a container that could not
/// be created or started is removed here.
pub fn run(dir: &Path, id: &str, report_to: Option<File>, start: bool) -> ! {
    let set = block_forwarded_signals();
    let mut report_to = report_to;
    let uds = dir.join(VSOCK_SOCKET);
    let target = Target {
        uds: uds.clone(),
        id: id.to_owned(),
        exec_id: None,
    };
    let mut vm_ended = None;
    // Under `run` the record, written before we started, is what the hooks are told.
    let record = if start {
        read_record(dir).map(Some).map_err(|e| e.to_string())
    } else {
        Ok(None)
    };
    let mut hooks_ran = false;
    let result = record.as_ref().map_err(Clone::clone).and_then(|record| {
        let launch = read_launch(dir)?;
        crate::logging::phase("vm starting");
        let ended = vm_ended.insert(start_vm(&launch, &uds));
        let (stdio, mut client) = open(&target, &launch, ended)?;
        if let Some(record) = record {
            hooks_ran = true;
            start_with_hooks(&mut client, dir, record)?;
        }
        Ok(stdio)
    });
    report(
        &mut report_to,
        &result.as_ref().map(|_| ()).map_err(Clone::clone),
        || {
            if hooks_ran && let Ok(mut client) = AgentClient::connect(&uds) {
                // Stopped before its state goes and the poststop hooks run, as `create` does by
                // killing its monitor; the VM itself ends with this process.
                let _ = client.remove_container(id);
            }
            let _ = std::fs::remove_dir_all(dir);
            if hooks_ran && let Ok(Some(record)) = &record {
                crate::cli::create::run_poststop_hooks(record);
            }
        },
    );
    let Ok(stdio) = result else {
        std::process::exit(1);
    };
    let status = wait_and_forward(target, stdio, vm_ended.as_ref(), set);
    crate::logging::phase("container exited");
    record_exit(&dir.join(EXIT_FILE), &status);
    exit_like(status)
}

/// Under `run`: the prestart and createRuntime hooks (a failure fails the run), the start,
/// then the poststart hooks (a failure is a warning), each told the state at that point.
fn start_with_hooks(client: &mut AgentClient, dir: &Path, record: &Record) -> Result<(), String> {
    let hook_list = record.hooks.as_ref();
    hooks::run(
        hook_list,
        &hooks::CREATE,
        &record.oci_state(ContainerState::Creating),
    )
    .map_err(|e| e.to_string())?;
    client
        .start_container(&record.id)
        .map_err(|e| e.to_string())?;
    crate::logging::phase("container started");
    let state = record.oci_state(status(dir, record).oci());
    hooks::run_warning(hook_list, Stage::Poststart, &state);
    Ok(())
}

/// Boots the VM on its own thread; the channel says when (and why) it ended.
fn start_vm(launch: &Launch, uds: &Path) -> mpsc::Receiver<String> {
    let config = VmConfig {
        kernel: launch.kernel.clone(),
        initrd: Some(launch.initrd.clone()),
        cmdline: None,
        cpus: launch.cpus,
        memory_mib: launch.memory_mib,
        disks: launch
            .images
            .iter()
            .chain(launch.host_files.iter())
            .map(|image| DiskConfig {
                path: image.clone(),
                read_only: true,
            })
            .collect(),
        rng: false,
        vsock: Some(VsockConfig {
            cid: 3,
            uds: uds.to_owned(),
        }),
        net: None,
        console: ConsoleConfig::Off,
    };
    let (tx, rx) = mpsc::channel();
    let _ = std::thread::Builder::new()
        .name("vm".into())
        .spawn(move || {
            let reason = match builder::run_with_signals(
                &config,
                Instant::now(),
                SystemTime::now(),
                false,
            ) {
                Ok(outcome) => {
                    let reason = outcome.reason.to_string();
                    // The vCPU threads may still be in KVM_RUN: keep guest memory mapped.
                    std::mem::forget(outcome);
                    reason
                }
                Err(e) => format!("the microVM could not start: {e}"),
            };
            let _ = tx.send(reason);
        });
    rx
}

fn wait_for_agent(
    uds: &Path,
    vm_ended: &mpsc::Receiver<String>,
    timeout: Duration,
) -> Result<AgentClient, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(reason) = vm_ended.try_recv() {
            return Err(format!("the microVM stopped while booting: {reason}"));
        }
        if let Ok(mut client) = AgentClient::connect(uds)
            && client.hello().is_ok()
        {
            return Ok(client);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the guest agent did not answer within {} s",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Guest identity, stdio, the container created. Returns the agent connection too, for a
/// start that follows at once.
fn open(
    target: &Target,
    launch: &Launch,
    vm_ended: &mpsc::Receiver<String>,
) -> Result<(Stdio, AgentClient), String> {
    let id = &target.id;
    let mut client = wait_for_agent(
        &target.uds,
        vm_ended,
        Duration::from_secs(launch.boot_timeout_secs),
    )?;
    crate::logging::phase("agent up");
    let mut entropy = vec![0u8; 64];
    // SAFETY: getrandom fills the buffer it is given.
    unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) };
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    client
        .setup_guest(GuestSetup {
            hostname: Some(
                launch
                    .spec
                    .hostname()
                    .clone()
                    .unwrap_or_else(|| id.chars().take(64).collect()),
            ),
            realtime_ns: Some(now.as_nanos() as u64),
            entropy,
        })
        .map_err(|e| e.to_string())?;
    let terminal = launch.spec.process().as_ref().and_then(|p| p.terminal()) == Some(true);
    let stdio = Stdio::attach(
        &target.uds,
        id,
        None,
        terminal,
        launch.console_socket.as_deref(),
    )?;
    // The guest names disks in the order they are given: the layers, then the host files.
    let disk = |i: usize| format!("/dev/vd{}", (b'a' + i as u8) as char);
    let layers = (0..launch.images.len()).map(disk).collect();
    let host_files = launch
        .host_files
        .as_ref()
        .map(|_| disk(launch.images.len()));
    client
        .create_container(CreateContainer {
            container_id: id.clone(),
            spec: Box::new(launch.spec.clone()),
            layers,
            host_files,
            stdio: stdio.config,
        })
        .map_err(|e| e.to_string())?;
    crate::logging::phase("container created");
    if let Some((rows, cols)) = stdio.window_size() {
        let _ = client.resize_terminal(id, None, rows, cols);
    }
    Ok((stdio, client))
}
