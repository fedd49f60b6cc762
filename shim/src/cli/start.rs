//! `cocoon start`: let a created container's process exec, then run the poststart hooks.

use cocoon_runtime::control::{self, Request};
use cocoon_runtime::launch::Launch;
use cocoon_runtime::network;

use super::Global;
use crate::error::CliError;
use crate::hooks::{self, Stage};
use crate::state::{CONTROL_SOCKET, ContainerDir, Status, VSOCK_SOCKET, status};

pub fn start(global: &Global, id: &str) -> Result<(), CliError> {
    let dir = ContainerDir::open(&global.root, id)?;
    let mut record = dir.read()?;
    match status(&dir.path, &record) {
        Status::Created => {}
        other => {
            return Err(CliError::WrongState {
                id: id.into(),
                status: other.name(),
                wanted: "created",
            });
        }
    }
    // An engine that fills a new network namespace itself (Docker, from a prestart hook) has
    // done so by now: the monitor carries it into the VM before the process runs.
    let launch = Launch::read(&dir.path)?;
    if network::netns_of(&launch.spec) == network::SpecNetns::New {
        control::call(&dir.file(CONTROL_SOCKET), &Request::CarryNetwork)?;
    }
    // Unlocked: a guest that does not answer must not hold off kill or delete. A second
    // `start` meanwhile is refused by the agent (the process is no longer created).
    dir.unlocked(|| crate::cli::container_at(&dir.file(VSOCK_SOCKET), id).start())??;
    record.started = true;
    dir.write(&record)?;
    // The state as it is now: a process that exits at once is already stopped. Unlocked, so a
    // hook may exec into the container or ask for its state.
    let state = record.oci_state(status(&dir.path, &record).oci());
    dir.unlocked(|| hooks::run_warning(record.hooks.as_ref(), Stage::Poststart, &state))
}
