//! `cocoon ps`: the container's processes, as guest pids (they live in the VM's kernel).

use super::Global;
use crate::error::CliError;
use crate::state::{ContainerDir, Status, VSOCK_SOCKET, status};

pub fn ps(global: &Global, id: &str, format: &str) -> Result<(), CliError> {
    let dir = ContainerDir::open(&global.root, id)?;
    let record = dir.read()?;
    match status(&dir.path, &record) {
        Status::Stopped => return Err(CliError::NotRunning),
        // The agent answers only while the vCPUs run.
        Status::Paused => return Err(CliError::Paused(id.into())),
        Status::Created | Status::Running => {}
    }
    // Asked unlocked: a guest that does not answer must not hold off kill or delete.
    let pids =
        dir.unlocked(|| crate::cli::container_at(&dir.file(VSOCK_SOCKET), id).processes())??;
    match format {
        "json" => println!("{}", serde_json::to_string(&pids).unwrap_or_default()),
        "table" => {
            println!("PID");
            for pid in pids {
                println!("{pid}");
            }
        }
        other => return Err(CliError::Other(format!("invalid format option {other:?}"))),
    }
    Ok(())
}
