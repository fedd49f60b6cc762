//! What the host side of cocoon and the guest agent agree on: the boot self-check, the guest
//! status page, and the agent protocol (framing, messages, and the host's client), and how both read an OCI spec.

pub mod boot_check;
pub mod client;
pub mod frame;
pub mod guest_status;
pub mod message;
pub mod spec;
