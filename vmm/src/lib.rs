//! cocoon-vmm: a minimal KVM virtual machine monitor for one container's microVM.
//!
//! `builder::run` reads top to bottom as the boot flow; see docs/architecture.md.

pub mod arch;
pub mod boot_image;
pub mod builder;
pub mod bus;
pub mod cmdline;
pub mod config;
pub mod devices;
pub mod event_loop;
pub mod host;
pub mod lifecycle;
pub mod metrics;
pub mod vcpu;
