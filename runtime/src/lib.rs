//! cocoon-runtime: what every cocoon front end shares. A front end (the runc-style `cocoon`
//! CLI, the containerd shim) turns its engine's requests into calls here:
//!
//! - `bundle`, `images`, `shares`: an OCI bundle checked, its root filesystem as EROFS
//!   layer images, the host files it bind-mounts shared with the guest over virtio-fs;
//! - `launch`: what a container's sandbox needs, written by `create` for its monitor;
//! - `sandbox`: one microVM and its agent ([`sandbox::Sandbox`]) and the containers in it
//!   ([`sandbox::Container`]);
//! - `admission`: a VM starts when the host can carry its start (or waits its turn);
//! - `progress`: whether a guest is getting anywhere (waits on it are judged by that);
//! - `control`: the socket over which other processes reach a sandbox's VMM (pause, resume);
//! - `state`: the per-container directory and record; `hooks`: the spec's hooks on the host;
//! - `template`: booted VMs saved once, which sandboxes are restored from;
//! - `network`: the engine's network namespace carried into the VM (TAPs, tc mirroring);
//! - `stdio`, `console`: a process's stdio and terminal relayed to the guest.

pub mod admission;
pub mod bundle;
pub mod checkpoint;
pub mod config;
pub mod console;
pub mod control;
pub mod error;
pub mod hooks;
pub mod images;
pub mod launch;
pub mod layer_cache;
pub mod network;
pub mod phase;
pub mod progress;
pub mod sandbox;
pub mod shares;
pub mod signal;
pub mod state;
pub mod stdio;
pub mod template;

pub use error::Error;
pub use sandbox::{Container, Sandbox, SandboxConfig, StartPlan};
