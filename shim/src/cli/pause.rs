//! `cocoon pause` and `cocoon resume`: the container's monitor stops and restarts the microVM's
//! vCPUs, so everything in the guest (processes, timers, the guest clock's progress as the
//! guest sees it) stands still. Only the monitor holds the VM: the verbs ask it over the
//! control socket.

use cocoon_runtime::control::{self, Request};

use super::Global;
use crate::error::CliError;
use crate::state::{CONTROL_SOCKET, ContainerDir, Status, status};

pub fn pause(global: &Global, id: &str) -> Result<(), CliError> {
    let dir = ContainerDir::open(&global.root, id)?;
    let record = dir.read()?;
    match status(&dir.path, &record) {
        Status::Running => Ok(control::call(&dir.file(CONTROL_SOCKET), &Request::Pause)?),
        Status::Paused => Err(CliError::WrongState {
            id: id.into(),
            status: "paused",
            wanted: "running",
        }),
        other => Err(CliError::WrongState {
            id: id.into(),
            status: other.name(),
            wanted: "running",
        }),
    }
}

pub fn resume(global: &Global, id: &str) -> Result<(), CliError> {
    let dir = ContainerDir::open(&global.root, id)?;
    let record = dir.read()?;
    match status(&dir.path, &record) {
        Status::Paused => Ok(control::call(&dir.file(CONTROL_SOCKET), &Request::Resume)?),
        _ => Err(CliError::NotPaused(id.into())),
    }
}
