//! virtio-net backed by a TAP device on the host.

pub mod device;
pub mod persist;
pub mod tap;

pub use device::Net;
