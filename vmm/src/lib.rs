//! cocoon-vmm: a minimal KVM virtual machine monitor for one container's microVM.
//!
//! `builder::build` reads top to bottom as the boot flow and hands a paused [`vm::Vm`] to its
//! caller; see docs/architecture.md.

pub mod api;
pub mod arch;
pub mod boot_image;
pub mod builder;
pub mod bus;
pub mod cmdline;
pub mod config;
pub mod devices;
pub mod event_loop;
pub mod host;
pub mod jail;
pub mod lifecycle;
pub mod metrics;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
