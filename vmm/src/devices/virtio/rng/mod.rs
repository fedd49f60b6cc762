//! virtio-rng: entropy for the guest from the host's `getrandom`, so the guest kernel's random
//! pool is seeded at boot without waiting for interrupts to trickle in.

pub mod device;
pub mod persist;

pub use device::Rng;
