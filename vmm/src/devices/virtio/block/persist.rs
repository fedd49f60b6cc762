//! What a snapshot keeps of a block device: which image it serves and what the guest was told
//! about it. Requests are served to completion on the device thread while the transport's lock
//! is held, so a paused, locked device has none in flight and there is nothing else to keep.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Block, Disk};
use crate::config::DiskConfig;
use crate::devices::virtio::persist::PersistError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The image, absolute.
    pub path: PathBuf,
    pub read_only: bool,
    /// In 512-byte sectors, as the guest last read it from config space.
    pub capacity: u64,
    /// Whether VIRTIO_BLK_F_RO was offered (and so possibly negotiated).
    pub read_only_offered: bool,
}

impl BlockState {
    pub fn save(block: &Block) -> BlockState {
        BlockState {
            path: block.disk().path().to_owned(),
            read_only: block.disk().read_only(),
            capacity: block.disk().capacity(),
            read_only_offered: block.read_only_offered(),
        }
    }

    /// Reopens the image (`over`'s if given, else the saved one). Also says whether its
    /// capacity is not the one the guest knows (the image was replaced or resized meanwhile),
    /// for the transport to announce as a configuration change.
    pub fn restore(
        &self,
        id: &str,
        over: Option<&DiskConfig>,
    ) -> Result<(Block, bool), PersistError> {
        let (path, read_only) = match over {
            Some(disk) => (disk.path.as_path(), disk.read_only),
            None => (self.path.as_path(), self.read_only),
        };
        let disk = Disk::open(path, read_only).map_err(|source| PersistError::Disk {
            id: id.into(),
            source,
        })?;
        let changed = disk.capacity() != self.capacity;
        if changed {
            tracing::info!(
                device = id,
                saved = self.capacity,
                now = disk.capacity(),
                "restored disk has another size; the guest is told"
            );
        }
        Ok((Block::with_offer(disk, self.read_only_offered), changed))
    }
}
