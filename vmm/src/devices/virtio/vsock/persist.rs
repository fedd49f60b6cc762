//! What a snapshot keeps of a vsock device: the guest's CID and the host socket's path.
//! Connections are not kept, by design: their other ends are sockets of the old process. A
//! restored device starts with none and, in `after_restore`, tells the guest its transport was
//! reset so it drops its side too.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Vsock;
use crate::config::{MAX_GUEST_CID, MIN_GUEST_CID};
use crate::devices::virtio::persist::PersistError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub cid: u64,
    /// Absolute.
    pub uds_path: PathBuf,
    /// The host-side port for the next host-initiated connection. A restored device goes on
    /// from here: the guest may still hold sockets of the saved process's connections (reset
    /// but not yet closed by their owners), and a new connection reusing one of their ports
    /// would reach that dead socket and be refused.
    pub next_port: u32,
}

impl VsockState {
    pub fn save(vsock: &Vsock) -> VsockState {
        let path = vsock.uds_path();
        VsockState {
            cid: vsock.cid(),
            uds_path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
            next_port: vsock.next_port(),
        }
    }

    /// Listens on `over` if given, else on the saved path (a stale socket there is replaced).
    pub fn restore(&self, id: &str, over: Option<&Path>) -> Result<Vsock, PersistError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&self.cid) {
            return Err(PersistError::Device {
                id: id.into(),
                reason: format!(
                    "guest CID {} is outside {MIN_GUEST_CID}..={MAX_GUEST_CID}",
                    self.cid
                ),
            });
        }
        let path = over.unwrap_or(&self.uds_path);
        let mut vsock = Vsock::new(self.cid, path).map_err(|source| PersistError::Io {
            id: id.into(),
            what: format!("listen on vsock socket {}", path.display()),
            source,
        })?;
        vsock.continue_ports_from(self.next_port);
        Ok(vsock)
    }
}
