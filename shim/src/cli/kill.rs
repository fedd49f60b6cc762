//! `cocoon kill`: a signal to the container's init, or with `--all` to all its processes.

use cocoon_runtime::Container;
use cocoon_runtime::control::{self, Request};

use super::Global;
use crate::error::CliError;
use crate::state::{CONTROL_SOCKET, ContainerDir, Status, VSOCK_SOCKET, status};

pub fn kill(global: &Global, id: &str, signal: &str, all: bool) -> Result<(), CliError> {
    let signal = crate::signal::parse(signal)?;
    let dir = ContainerDir::open(&global.root, id)?;
    let record = dir.read()?;
    match status(&dir.path, &record) {
        Status::Stopped => Err(CliError::NotRunning),
        // The monitor holds signals until the vCPUs run again (SIGKILL resumes them to die).
        Status::Paused => Ok(control::call(
            &dir.file(CONTROL_SOCKET),
            &Request::Signal { signal, all },
        )?),
        Status::Created | Status::Running => {
            Container::new(&dir.file(VSOCK_SOCKET), id).signal(None, signal, all)
        }
    }
}
