//! What the host side of cocoon and the guest agent agree on.

pub mod boot_check;
pub mod guest_status;
