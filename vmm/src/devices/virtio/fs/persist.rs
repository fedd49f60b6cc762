//! What a snapshot keeps of a virtio-fs device: its tag, and whether a FUSE session held
//! nodes. A session's nodes are open host descriptors, which a snapshot cannot carry, so only
//! a device the guest has not used yet (as in a template, whose shares come after the
//! restore) can be restored.

use serde::{Deserialize, Serialize};

use super::Fs;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    pub tag: String,
    /// The guest held nodes of the file server when the snapshot was taken.
    pub in_use: bool,
}

impl FsState {
    pub fn restore(&self) -> Result<Fs, String> {
        if self.in_use {
            return Err(
                "the guest had files of its virtio-fs shares open (a FUSE session \
                 cannot be carried across a snapshot); unmount them before the snapshot"
                    .into(),
            );
        }
        Fs::new(&self.tag).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_device_the_guest_never_used_restores() {
        let unused = FsState {
            tag: "cocoon".into(),
            in_use: false,
        };
        assert_eq!(unused.restore().unwrap().tag(), "cocoon");
        let used = FsState {
            in_use: true,
            ..unused.clone()
        };
        assert!(
            used.restore()
                .err()
                .is_some_and(|e| e.contains("FUSE session"))
        );
        let bad_tag = FsState {
            tag: String::new(),
            ..unused
        };
        assert!(
            bad_tag.restore().is_err(),
            "a snapshot's tag is checked too"
        );
    }
}
