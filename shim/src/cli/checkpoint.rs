//! `cocoon checkpoint` and `cocoon restore`: runc's checkpoint and restore, done by snapshotting
//! the container's microVM instead of with CRIU. A checkpoint is the VM's snapshot (guest RAM,
//! vCPUs, devices) and the id of the container in it; a restore prepares the bundle's images as
//! `create` does, then restores the VM in a new monitor instead of booting one, so every process
//! of the container goes on from where it stood. The checkpointed container's stdio does not
//! carry over: a restored container runs detached from it.

use cocoon_runtime::control::{self, Request};

use super::{CheckpointArgs, Global, RestoreArgs};
use crate::cli::create::{prepare, record, spawn_monitor, write_pid_file};
use crate::error::CliError;
use crate::state::{CONTROL_SOCKET, ContainerDir, Status, status};

pub fn checkpoint(global: &Global, args: &CheckpointArgs) -> Result<(), CliError> {
    let dir = ContainerDir::open(&global.root, &args.id)?;
    let record = dir.read()?;
    match status(&dir.path, &record) {
        Status::Running | Status::Paused => {}
        _ => return Err(CliError::NotRunning),
    }
    let image =
        std::path::absolute(&args.image_path).map_err(CliError::io("resolve", &args.image_path))?;
    control::call(
        &dir.file(CONTROL_SOCKET),
        &Request::Checkpoint {
            dir: image,
            leave_running: args.leave_running,
        },
    )?;
    Ok(())
}

pub fn restore(global: &Global, args: &RestoreArgs) -> Result<(), CliError> {
    let image =
        std::path::absolute(&args.image_path).map_err(CliError::io("resolve", &args.image_path))?;
    // Checked before anything is made: a bad path loses nothing.
    cocoon_runtime::checkpoint::read(&image)?;
    let (dir, bundle) = prepare(global, &args.create)?;
    let id = dir.id.clone();
    let mut restore_from = std::ffi::OsString::from("--restore-from=");
    restore_from.push(&image);
    if args.detach {
        let monitor = match spawn_monitor(global, "monitor", &[restore_from], &[&id]) {
            Ok(monitor) => monitor,
            Err(e) => {
                let _ = dir.remove();
                return Err(e);
            }
        };
        let pid = monitor.pid;
        let result = dir
            .write(&record(&dir, &bundle, pid, true))
            .and_then(|()| write_pid_file(args.create.pid_file.as_deref(), pid));
        let result = match result {
            Ok(()) => monitor.confirm().map(drop),
            Err(e) => {
                monitor.stop();
                Err(e)
            }
        };
        if result.is_err() {
            let _ = dir.remove();
        }
        return result;
    }
    let pid = std::process::id() as i32;
    if let Err(e) = dir
        .write(&record(&dir, &bundle, pid, true))
        .and_then(|()| write_pid_file(args.create.pid_file.as_deref(), pid))
    {
        let _ = dir.remove();
        return Err(e);
    }
    let path = dir.path.clone();
    // Other verbs must be able to lock the container while it runs.
    drop(dir);
    crate::monitor::container::run(&path, &id, None, false, Some(&image))
}
