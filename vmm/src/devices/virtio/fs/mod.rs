//! virtio-fs (device type 26): host directories and files shared live with the guest, over
//! the FUSE protocol, served by a passthrough file server inside the VMM (docs/volumes.md says
//! why inside and not an external `virtiofsd`).

pub mod device;
pub mod host;
pub mod persist;
pub mod protocol;
pub mod server;

pub use device::{Fs, FsError};
pub use server::{Server, Share, ShareError};
