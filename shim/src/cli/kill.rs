//! `cocoon kill`: a signal to the container's init, or with `--all` to all its processes.

use cocoon_runtime::control::{self, Request};

use std::time::{Duration, Instant};

use super::Global;
use super::delete::end_monitor;
use crate::error::CliError;
use crate::state::{
    CONTROL_SOCKET, ContainerDir, Record, Status, VSOCK_SOCKET, monitor_alive, status,
};

/// How long the guest has to take a signal. A loaded guest answers in a second or two.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// SIGKILL is bounded on the host side: engines wait only a few seconds after `kill` returns
/// for the container's process to be gone (Podman's `rm --force --time 0` gives it 5 s), and
/// on a loaded host the guest may take longer than that to report its init's death. The
/// guest gets this long to take the signal and as long again for the monitor to see the exit
/// (and forward the last output); then the VM is ended from the host.
const SIGKILL_GRACE: Duration = Duration::from_secs(2);

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
        Status::Created | Status::Running if signal == libc::SIGKILL => {
            sigkill(&dir, id, &record, all)
        }
        // Unlocked: a guest that does not answer must not hold off delete (or a SIGKILL).
        Status::Created | Status::Running => dir.unlocked(|| {
            crate::cli::container_at(&dir.file(VSOCK_SOCKET), id)
                .with_timeout(KILL_TIMEOUT)
                .signal(None, signal, all)
        })?,
    }
}

/// SIGKILL cannot be refused: whatever the guest does, the container's monitor (the process
/// the engine waits on) is gone when this returns, and its exit status says SIGKILL.
fn sigkill(dir: &ContainerDir, id: &str, record: &Record, all: bool) -> Result<(), CliError> {
    let container =
        crate::cli::container_at(&dir.file(VSOCK_SOCKET), id).with_timeout(SIGKILL_GRACE);
    match container.signal(None, libc::SIGKILL, all) {
        Ok(()) => {
            let deadline = Instant::now() + SIGKILL_GRACE;
            while monitor_alive(record) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if monitor_alive(record) {
                tracing::info!(
                    "container {id}: the guest took SIGKILL but has not reported the exit; \
                     ending its VM"
                );
            }
        }
        Err(e) => {
            tracing::warn!("container {id}: the guest did not take SIGKILL ({e}); ending its VM")
        }
    }
    end_monitor(id, record)
}
