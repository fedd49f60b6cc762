//! Facts about the host that change how a guest must be started.

use std::path::Path;

/// Whether `/dev/kvm` is provided by the PVM module (pagetable-based virtual machine), where guest
/// kernel code runs in KVM's instruction emulator and needs the options in
/// [`crate::cmdline::PVM_OPTIONS`].
pub fn is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}
