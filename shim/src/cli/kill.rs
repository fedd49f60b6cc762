//! `cocoon kill`: a signal to the container's init, or with `--all` to all its processes.

use cocoon_agent_protocol::client::AgentClient;

use super::Global;
use crate::error::CliError;
use crate::state::{ContainerDir, Status, VSOCK_SOCKET, status};

pub fn kill(global: &Global, id: &str, signal: &str, all: bool) -> Result<(), CliError> {
    let signal = crate::signal::parse(signal)?;
    let dir = ContainerDir::open(&global.root, id)?;
    let record = dir.read()?;
    if status(&dir.path, &record) == Status::Stopped {
        return Err(CliError::Other("container not running".into()));
    }
    AgentClient::connect(&dir.file(VSOCK_SOCKET))?.signal(id, None, signal, all)?;
    Ok(())
}
