//! The small pieces the VMM shares with the rest of cocoon, kept apart so that the VMM does not
//! depend on the agent protocol (and its serde/OCI dependencies): the guest status page the
//! agent writes to, and Unix sockets reachable at paths of any length.

pub mod guest_status;
pub mod uds;
