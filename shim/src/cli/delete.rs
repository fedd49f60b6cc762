//! `cocoon delete`: remove a stopped container; with `--force`, stop it first. Afterwards no
//! process, socket, image or state of it is left, and its poststop hooks have run.

use std::time::{Duration, Instant};

use super::Global;
use crate::cli::create::run_poststop_hooks;
use crate::error::CliError;
use crate::state::{ContainerDir, Record, Status, monitor_alive, status};

pub fn delete(global: &Global, id: &str, force: bool) -> Result<(), CliError> {
    let dir = match ContainerDir::open(&global.root, id) {
        Ok(dir) => dir,
        Err(CliError::NotExist(_)) if force => {
            // A create that was killed half-way leaves a directory without a record, and
            // maybe a carried network; its monitor died with it (see `spawn_monitor`).
            crate::state::check_id(id)?;
            let path = global.root.join(id);
            release_network(&path);
            let _ = std::fs::remove_dir_all(path);
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let record = dir.read()?;
    let current = status(&dir.path, &record);
    if matches!(current, Status::Running | Status::Paused) && !force {
        return Err(CliError::NotStopped(id.into(), current.name()));
    }
    end_monitor(id, &record)?;
    release_network(&dir.path);
    dir.remove()?;
    // As runc: once the container and its state are gone.
    run_poststop_hooks(&record);
    Ok(())
}

/// Once the VM is gone, and its TAPs with it: the engine's interfaces lose their mirroring.
fn release_network(dir: &std::path::Path) {
    let network_file = dir.join(cocoon_runtime::network::NETWORK_FILE);
    if let Ok(record) =
        crate::state::read_json::<cocoon_runtime::network::NetworkRecord>(&network_file)
        && let Err(e) = cocoon_runtime::network::release(&record)
    {
        // The container still goes: a delete that failed here would leave it undeletable.
        tracing::warn!("{e}");
    }
}

/// Ends the container's monitor, and so its VM and everything in it, whatever the guest does;
/// returns once it is gone.
pub fn end_monitor(id: &str, record: &Record) -> Result<(), CliError> {
    if !monitor_alive(record) {
        return Ok(());
    }
    // SAFETY: kill(2) on the pid the record names, checked to be our monitor just above.
    unsafe { libc::kill(record.pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while monitor_alive(record) {
        if Instant::now() > deadline {
            return Err(CliError::Other(format!(
                "container {id}'s process {} did not die",
                record.pid
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
