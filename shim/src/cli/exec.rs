//! `cocoon exec`: a further process in a running container. Like the container's own process,
//! it is stood for on the host by a monitor: this process (or, with `--detach`, a child whose pid
//! goes to `--pid-file`).

use std::path::Path;

use cocoon_runtime::launch::Launch;
use oci_spec::runtime::{Capability, Process};

use super::{ExecArgs, Global};
use crate::cli::create::{spawn_monitor, write_pid_file};
use crate::error::CliError;
use crate::monitor::exec::{ExecLaunch, launch_file, run};
use crate::state::{ContainerDir, Status, status, write_atomically};

/// A fresh exec id: the agent keys processes by it.
fn new_exec_id() -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom fills the buffer it is given.
    unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The process to run: `--process FILE`, or the container's own process with the command and
/// flags applied (what runc does).
fn process(args: &ExecArgs, dir: &Path) -> Result<Process, CliError> {
    if let Some(path) = &args.process {
        let text = std::fs::read(path).map_err(CliError::io("read", path))?;
        return serde_json::from_slice(&text)
            .map_err(|e| CliError::Other(format!("invalid process {}: {e}", path.display())));
    }
    if args.command.is_empty() {
        return Err(CliError::Other("exec needs a command or --process".into()));
    }
    let launch = Launch::read(dir)?;
    let mut process = launch.spec.process().clone().unwrap_or_default();
    process.set_args(Some(args.command.clone()));
    process.set_terminal(Some(args.tty));
    if let Some(cwd) = &args.cwd {
        process.set_cwd(cwd.clone());
    }
    let mut env = process.env().clone().unwrap_or_default();
    for pair in &args.env {
        let key = pair.split('=').next().unwrap_or_default();
        env.retain(|e| e.split('=').next() != Some(key));
        env.push(pair.clone());
    }
    process.set_env(Some(env));
    if let Some(user) = &args.user {
        let invalid = || CliError::Other(format!("invalid --user {user:?}: want UID[:GID]"));
        let (uid, gid) = user.split_once(':').unwrap_or((user, "0"));
        let user_spec = process.user_mut();
        user_spec.set_uid(uid.parse().map_err(|_| invalid())?);
        user_spec.set_gid(gid.parse().map_err(|_| invalid())?);
    }
    if !args.additional_gids.is_empty() {
        process
            .user_mut()
            .set_additional_gids(Some(args.additional_gids.clone()));
    }
    if args.no_new_privs {
        process.set_no_new_privileges(Some(true));
    }
    if !args.cap.is_empty() {
        let mut caps = process.capabilities().clone().unwrap_or_default();
        for name in &args.cap {
            let cap: Capability =
                serde_json::from_value(serde_json::Value::String(name.clone()))
                    .map_err(|_| CliError::Other(format!("unknown capability {name:?}")))?;
            for set in [
                caps.bounding().clone(),
                caps.effective().clone(),
                caps.permitted().clone(),
                caps.inheritable().clone(),
                caps.ambient().clone(),
            ]
            .iter()
            .enumerate()
            {
                let mut set_caps = set.1.clone().unwrap_or_default();
                set_caps.insert(cap);
                match set.0 {
                    0 => caps.set_bounding(Some(set_caps)),
                    1 => caps.set_effective(Some(set_caps)),
                    2 => caps.set_permitted(Some(set_caps)),
                    3 => caps.set_inheritable(Some(set_caps)),
                    _ => caps.set_ambient(Some(set_caps)),
                };
            }
        }
        process.set_capabilities(Some(caps));
    }
    Ok(process)
}

pub fn exec(global: &Global, args: &ExecArgs) -> Result<(), CliError> {
    let dir = ContainerDir::open(&global.root, &args.id)?;
    let record = dir.read()?;
    let current = status(&dir.path, &record);
    if current != Status::Running {
        return Err(CliError::WrongState {
            id: args.id.clone(),
            status: current.name(),
            wanted: "running",
        });
    }
    let process = process(args, &dir.path)?;
    if process.terminal() == Some(true) && args.console_socket.is_none() && args.detach {
        return Err(CliError::Other(
            "a detached exec with a terminal needs --console-socket".into(),
        ));
    }
    let launch = ExecLaunch {
        exec_id: new_exec_id(),
        process,
        console_socket: args
            .console_socket
            .as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
    };
    let path = dir.path.clone();
    // Other verbs must be able to lock the container while the process runs.
    drop(dir);
    if !args.detach {
        write_pid_file(args.pid_file.as_deref(), std::process::id() as i32)?;
        run(&path, &args.id, launch, None);
    }
    let file = launch_file(&path, &launch.exec_id);
    write_atomically(
        &file,
        &serde_json::to_vec(&launch).map_err(|e| CliError::Other(e.to_string()))?,
    )?;
    let monitor = spawn_monitor(global, "exec-monitor", &[], &[&args.id, &launch.exec_id])
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&file);
        })?;
    // Without its pid in the engine's hands nobody would wait for the process: on failure, the
    // monitor is told so and ends it (it is already running in the guest).
    match write_pid_file(args.pid_file.as_deref(), monitor.pid) {
        Ok(()) => monitor.confirm().map(drop),
        Err(e) => {
            monitor.abandon();
            Err(e)
        }
    }
}

/// The hidden `exec-monitor` verb: the detached exec's monitor.
pub fn exec_monitor(global: &Global, id: &str, exec_id: &str) -> Result<(), CliError> {
    crate::state::check_id(id)?;
    crate::state::check_id(exec_id)?;
    let dir = global.root.join(id);
    let file = launch_file(&dir, exec_id);
    let launch: ExecLaunch = std::fs::read(&file)
        .map_err(CliError::io("read", &file))
        .and_then(|t| serde_json::from_slice(&t).map_err(|e| CliError::Other(e.to_string())))?;
    run(&dir, id, launch, crate::monitor::report_channel())
}
