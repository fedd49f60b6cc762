//! An exec monitor: stands for one process exec'd into a running container, as runc's exec'd
//! process does for an engine (`exec --detach --pid-file` names it).

use std::fs::File;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Process;
use serde::{Deserialize, Serialize};

use cocoon_agent_protocol::message::ExecProcess;

use super::stdio::Stdio;
use super::{Target, block_forwarded_signals, exit_like, report, wait_and_forward};
use crate::state::VSOCK_SOCKET;

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
pub fn run(dir: &Path, id: &str, launch: ExecLaunch, report_to: Option<File>) -> ! {
    let set = block_forwarded_signals();
    let mut report_to = report_to;
    let target = Target {
        uds: dir.join(VSOCK_SOCKET),
        id: id.to_owned(),
        exec_id: Some(launch.exec_id.clone()),
    };
    let result = start(&target, &launch);
    let _ = std::fs::remove_file(launch_file(dir, &launch.exec_id));
    report(
        &mut report_to,
        &result.as_ref().map(|_| ()).map_err(Clone::clone),
        || {},
    );
    let Ok(stdio) = result else {
        std::process::exit(1);
    };
    let status = wait_and_forward(target, stdio, None, set);
    exit_like(status)
}

fn start(target: &Target, launch: &ExecLaunch) -> Result<Stdio, String> {
    let terminal = launch.process.terminal() == Some(true);
    let exec_id = launch.exec_id.as_str();
    let stdio = Stdio::attach(
        &target.uds,
        &target.id,
        Some(exec_id),
        terminal,
        launch.console_socket.as_deref(),
    )?;
    let mut client = target.client()?;
    client
        .exec_process(ExecProcess {
            container_id: target.id.clone(),
            exec_id: exec_id.to_owned(),
            process: Box::new(launch.process.clone()),
            stdio: stdio.config,
        })
        .map_err(|e| e.to_string())?;
    if let Some((rows, cols)) = stdio.window_size() {
        let _ = client.resize_terminal(&target.id, Some(exec_id), rows, cols);
    }
    Ok(stdio)
}
