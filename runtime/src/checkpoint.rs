//! A checkpoint of a running container (`cocoon checkpoint --image-path DIR`): its sandbox's VM
//! snapshot (`DIR/vm`) and which container of the guest it is (`DIR/checkpoint.json`). Restoring
//! (`cocoon restore --image-path DIR`) boots nothing: the VM goes on from the snapshot with the
//! new container's images as its disks, and the container's processes carry on where they were.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Error;

pub const CHECKPOINT_FILE: &str = "checkpoint.json";
const VM_DIR: &str = "vm";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The container's id in the guest.
    pub id: String,
}

/// Where the VM snapshot of checkpoint `dir` lives.
pub fn vm_dir(dir: &Path) -> PathBuf {
    dir.join(VM_DIR)
}

pub fn write(dir: &Path, checkpoint: &Checkpoint) -> Result<(), Error> {
    let json = serde_json::to_vec(checkpoint).map_err(|source| Error::Encode {
        what: "the checkpoint record",
        source,
    })?;
    crate::state::write_atomically(&dir.join(CHECKPOINT_FILE), &json)
}

pub fn read(dir: &Path) -> Result<Checkpoint, Error> {
    crate::state::read_json(&dir.join(CHECKPOINT_FILE))
}
