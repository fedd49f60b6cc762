//! `cocoon start`: let a created container's process exec, then run the poststart hooks.

use cocoon_runtime::Container;

use super::Global;
use crate::error::CliError;
use crate::hooks::{self, Stage};
use crate::state::{ContainerDir, Status, VSOCK_SOCKET, status};

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
    Container::new(&dir.file(VSOCK_SOCKET), id).start()?;
    record.started = true;
    dir.write(&record)?;
    // The state as it is now: a process that exits at once is already stopped. Unlocked, so a
    // hook may exec into the container or ask for its state.
    let state = record.oci_state(status(&dir.path, &record).oci());
    dir.unlocked(|| hooks::run_warning(record.hooks.as_ref(), Stage::Poststart, &state))
}
