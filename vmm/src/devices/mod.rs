//! Devices the guest sees: legacy port-I/O devices, the guest status page and virtio devices.

pub mod guest_status;
pub mod legacy;
pub mod registry;
pub mod virtio;
