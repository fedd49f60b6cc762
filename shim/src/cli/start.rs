//! `cocoon start`: let a created container's process exec.

use cocoon_agent_protocol::client::AgentClient;

use super::Global;
use crate::error::CliError;
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
    AgentClient::connect(&dir.file(VSOCK_SOCKET))?.start_container(id)?;
    record.started = true;
    dir.write(&record)
}
