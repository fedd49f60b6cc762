//! virtio-vsock: host-guest streams without a network, the host end on Unix sockets
//! (see `muxer.rs` for the socket protocol and docs/vsock.md).

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;
pub mod persist;

pub use device::Vsock;
