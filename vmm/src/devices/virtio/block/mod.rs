//! virtio-blk: a raw image file as the guest's disk.

pub mod device;
pub mod disk;
pub mod persist;
pub mod request;

pub use device::Block;
pub use disk::{Disk, DiskError};
