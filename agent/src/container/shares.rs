//! The host directories and files shared with the guest over virtio-fs: one file system (the
//! VM's one virtio-fs device, tag `SHARES_TAG`) whose root lists every share by name, mounted
//! once per guest at `SHARES_DIR`. Containers bind-mount their shares from there with their
//! spec's options; the mount itself has no `nosuid`/`nodev`/`noexec` of its own, since a bind
//! inherits its source mount's flags and the spec alone decides them, as under runc.
//!
//! It is mounted on first use, not at boot: a template is saved before any container runs,
//! with the device unused, which is the only state a snapshot can carry (a FUSE session's
//! nodes are open host descriptors).

use std::path::Path;
use std::sync::Mutex;

use cocoon_agent_protocol::message::{SHARES_DIR, SHARES_TAG};

use super::syscall::{Errno, Syscall};

#[derive(Debug, thiserror::Error)]
#[error("cannot mount the virtio-fs shares ({SHARES_TAG}) at {SHARES_DIR}: {0}")]
pub struct SharesError(Errno);

/// Whether the shares are mounted in the agent's mount namespace.
pub struct Shares {
    mounted: Mutex<bool>,
}

/// The guest's one mount of the shares.
pub static SHARES: Shares = Shares::new();

impl Shares {
    pub const fn new() -> Shares {
        Shares {
            mounted: Mutex::new(false),
        }
    }

    /// Mounts the shares unless they are: a second mount of the tag would stack on the first.
    /// Concurrent creates wait for one mount.
    pub fn mount_once(&self, sys: &dyn Syscall) -> Result<(), SharesError> {
        let mut mounted = self.mounted.lock().unwrap_or_else(|p| p.into_inner());
        if *mounted {
            return Ok(());
        }
        let dir = Path::new(SHARES_DIR);
        sys.mkdir(dir, 0o755).map_err(SharesError)?;
        sys.mount(Some(SHARES_TAG), dir, Some("virtiofs"), 0, None)
            .map_err(SharesError)?;
        *mounted = true;
        Ok(())
    }
}

/// Mounts the guest's shares, once.
pub fn mount_once(sys: &dyn Syscall) -> Result<(), SharesError> {
    SHARES.mount_once(sys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::syscall::recorder::Recorder;

    #[test]
    fn the_tag_is_mounted_once_and_a_failure_is_retried() {
        let shares = Shares::new();
        let failing = Recorder {
            failing: ["mount /run/cocoon/fs".to_owned()].into(),
            ..Recorder::default()
        };
        let err = shares.mount_once(&failing).unwrap_err().to_string();
        assert!(
            err.contains("virtio-fs shares (cocoon) at /run/cocoon/fs"),
            "{err}"
        );

        let sys = Recorder::default();
        shares.mount_once(&sys).unwrap();
        shares.mount_once(&sys).unwrap();
        assert_eq!(
            sys.calls_of("mount"),
            ["mount /run/cocoon/fs cocoon virtiofs 0x0 -"]
        );
        assert_eq!(sys.calls_of("mkdir"), ["mkdir /run/cocoon/fs 755"]);
    }
}
