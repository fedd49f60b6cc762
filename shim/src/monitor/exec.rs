//! An exec monitor: stands for one process exec'd into a running container, as runc's exec'd
//! process does for an engine (`exec --detach --pid-file` names it).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Process;
use serde::{Deserialize, Serialize};

use cocoon_agent_protocol::message::ExecProcess;
use cocoon_runtime::Container;

use super::{Direct, Target, block_forwarded_signals, exit_like, report, wait_and_forward};
use crate::error::CliError;
use crate::state::VSOCK_SOCKET;
use crate::stdio::Stdio;

/// What `exec` hands a detached exec monitor (in the container's directory).
#[derive(Debug, Serialize, Deserialize)]
pub struct ExecLaunch {
    pub exec_id: String,
    pub process: Process,
    pub console_socket: Option<PathBuf>,
}

pub fn launch_file(dir: &Path, exec_id: &str) -> PathBuf {
    dir.join(format!("exec-{exec_id}.json"))
}

/// Runs the exec monitor; never returns.
pub fn run(dir: &Path, id: &str, launch: ExecLaunch, report_to: Option<UnixStream>) -> ! {
    let set = block_forwarded_signals();
    let mut report_to = report_to;
    let target = Target {
        container: crate::cli::container_at(&dir.join(VSOCK_SOCKET), id),
        exec_id: Some(launch.exec_id.clone()),
    };
    let result = start(&target.container, &launch);
    let _ = std::fs::remove_file(launch_file(dir, &launch.exec_id));
    let go_on = report(&mut report_to, &result, || {});
    let Ok(stdio) = result else {
        std::process::exit(1);
    };
    if !go_on {
        // `exec` died or gave up before giving the engine our pid: nobody would wait for the
        // process, so it goes.
        if let Err(e) = target
            .container
            .signal(target.exec_id.as_deref(), libc::SIGKILL, false)
        {
            tracing::warn!("cannot kill the abandoned exec: {e}");
        }
        std::process::exit(1);
    }
    let status = wait_and_forward(target, stdio, None, Direct, set);
    exit_like(status)
}

fn start(container: &Container, launch: &ExecLaunch) -> Result<Stdio, CliError> {
    let terminal = launch.process.terminal() == Some(true);
    let exec_id = launch.exec_id.as_str();
    let stdio = Stdio::attach(
        container.vsock_socket(),
        container.id(),
        Some(exec_id),
        terminal,
        launch.console_socket.as_deref(),
    )?;
    container.exec(ExecProcess {
        container_id: container.id().to_owned(),
        exec_id: exec_id.to_owned(),
        process: Box::new(launch.process.clone()),
        stdio: stdio.config,
    })?;
    if let Some((rows, cols)) = stdio.window_size() {
        let _ = container.resize_terminal(Some(exec_id), rows, cols);
    }
    Ok(stdio)
}
