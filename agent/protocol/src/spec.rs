//! How the runtime and the agent read an OCI spec the same way.

use oci_spec::runtime::Mount;

/// A bind mount, whether the spec says so by type or (as runc accepts) only by option.
pub fn is_bind(mount: &Mount) -> bool {
    mount.typ().as_deref() == Some("bind")
        || mount
            .options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}
