//! `cocoon kill`: a signal to the container's init, or with `--all` to all its processes.

use cocoon_runtime::control::{self, Request};

use std::time::Duration;

use super::Global;
use super::delete::end_monitor;
use crate::error::CliError;
use crate::state::{CONTROL_SOCKET, ContainerDir, Status, VSOCK_SOCKET, status};

/// How long the guest has to take a signal. A loaded guest answers in a second or two; the
/// engine's own kill timeout is longer, so a SIGKILL that falls back to ending the VM still
/// returns in time.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

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
            let container =
                crate::cli::container_at(&dir.file(VSOCK_SOCKET), id).with_timeout(KILL_TIMEOUT);
            match container.signal(None, signal, all) {
                Ok(()) => Ok(()),
                // SIGKILL cannot be refused: a guest that does not take it has its VM ended,
                // which ends the container as surely.
                Err(e) if signal == libc::SIGKILL => {
                    tracing::warn!(
                        "container {id}: the guest did not take SIGKILL ({e}); ending its VM"
                    );
                    end_monitor(id, &record)
                }
                Err(e) => Err(e),
            }
        }
    }
}
