//! `cocoon state`: the container's state as the OCI runtime spec defines it.

use serde_json::json;

use super::Global;
use crate::error::CliError;
use crate::state::{ContainerDir, OCI_VERSION, Record, Status, status};

pub fn state_json(dir: &std::path::Path, record: &Record) -> serde_json::Value {
    let status = status(dir, record);
    let mut state = json!({
        "ociVersion": OCI_VERSION,
        "id": record.id,
        // runc reports 0 once the process is gone.
        "pid": if status == Status::Stopped { 0 } else { record.pid },
        "status": status.name(),
        "bundle": record.bundle,
        "rootfs": record.rootfs,
        "created": record.created,
        "owner": "",
    });
    if !record.annotations.is_empty() {
        state["annotations"] = json!(record.annotations);
    }
    state
}

pub fn state(global: &Global, id: &str) -> Result<(), CliError> {
    let dir = ContainerDir::open(&global.root, id)?;
    let record = dir.read()?;
    let text = serde_json::to_string_pretty(&state_json(&dir.path, &record))
        .map_err(|e| CliError::Other(e.to_string()))?;
    println!("{text}");
    Ok(())
}
