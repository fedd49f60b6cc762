//! virtio-net backed by a TAP device on the host (or by nothing, for a detached NIC).

pub mod coalesce;
pub mod device;
pub mod header;
pub mod persist;
pub mod tap;

pub use device::Net;
