//! virtio-net backed by a TAP device on the host.

pub mod device;
pub mod tap;

pub use device::Net;
