//! VM snapshots: a paused VM saved to a directory, and restored from it by a new process.
//!
//! A snapshot directory holds `memory.bin` (guest RAM, see `memory.rs`) and `state.bin`
//! (everything else: vCPUs, the interrupt controllers and clocks, every device, the VM's
//! layout; framed, versioned and checksummed by `format.rs`). `state.bin` is written last and
//! renamed into place, so a directory with one is a complete snapshot. See docs/snapshots.md.

pub mod format;
pub mod machine;
pub mod memory;

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use crate::config::{ConsoleConfig, TapSource, VmConfig};
use crate::devices::virtio::persist::{DeviceOverrides, PersistError, TransportState};
use crate::lifecycle::ExitReason;
use crate::vcpu::persist::{VcpuPersistError, VcpuSnapshot};
use format::FormatError;
use machine::{MachineError, MachineSnapshot};
use memory::{MemoryError, RegionLayout};

pub const STATE_FILE: &str = "state.bin";

/// Which kernel (or initramfs) a VM was booted from: a restore into a runtime configured with
/// other boot files would mix a guest with modules and agent it does not match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub path: PathBuf,
    pub len: u64,
    pub modified_ns: u128,
}

impl FileIdentity {
    pub fn of(path: &Path) -> std::io::Result<FileIdentity> {
        let meta = std::fs::metadata(path)?;
        let modified_ns = meta
            .modified()?
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Ok(FileIdentity {
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
            len: meta.len(),
            modified_ns,
        })
    }

    /// Same file contents as far as size and modification time tell, wherever it lives now.
    fn matches(&self, other: &FileIdentity) -> bool {
        self.len == other.len && self.modified_ns == other.modified_ns
    }
}

/// The boot files a snapshot was taken with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFiles {
    pub kernel: FileIdentity,
    pub initrd: Option<FileIdentity>,
}

impl BootFiles {
    pub fn of(config: &VmConfig) -> std::io::Result<BootFiles> {
        Ok(BootFiles {
            kernel: FileIdentity::of(&config.kernel)?,
            initrd: config.initrd.as_deref().map(FileIdentity::of).transpose()?,
        })
    }
}

/// Everything but guest RAM.
#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    /// The VM as it was configured (devices in guest order; a NIC given a TAP fd is saved
    /// detached); a restore changes only what the overrides name.
    pub config: VmConfig,
    pub boot_files: BootFiles,
    pub memory: Vec<RegionLayout>,
    pub machine: MachineSnapshot,
    pub vcpus: Vec<VcpuSnapshot>,
    /// Virtio transports by registry id, in guest order (their MMIO windows and IRQs follow).
    pub devices: Vec<(String, TransportState)>,
    pub serial: Option<crate::devices::legacy::persist::SerialState>,
    pub guest_status: crate::devices::guest_status::GuestStatusState,
}

/// What a restore may change.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    pub dir: PathBuf,
    pub overrides: DeviceOverrides,
    /// Where this process's serial console goes (the snapshot's choice is the default).
    pub console: Option<ConsoleConfig>,
    /// The boot files the caller runs with: a snapshot of others is refused.
    pub expect: Option<VmConfig>,
}

impl RestoreConfig {
    pub fn new(dir: &Path) -> RestoreConfig {
        RestoreConfig {
            dir: dir.to_owned(),
            overrides: DeviceOverrides::default(),
            console: None,
            expect: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM must be paused to be snapshotted")]
    NotPaused,
    #[error("the VM has ended: {0}")]
    Ended(ExitReason),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Format { path: PathBuf, source: FormatError },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vcpu(#[from] VcpuPersistError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Device(#[from] PersistError),
    #[error(
        "snapshot was taken with {what} {snapshot} ({snapshot_len} bytes), not {current} ({current_len} bytes)"
    )]
    BootFiles {
        what: &'static str,
        snapshot: PathBuf,
        snapshot_len: u64,
        current: PathBuf,
        current_len: u64,
    },
    #[error("snapshot is inconsistent: {0}")]
    Inconsistent(String),
    #[error("cannot build the restored VM: {0}")]
    Build(#[from] crate::builder::BuildError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_owned();
    move |source| SnapshotError::Io { what, path, source }
}

/// Writes `state.bin` atomically: a reader sees no state or all of it.
pub fn write_state(dir: &Path, snapshot: &VmSnapshot) -> Result<(), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = format::encode(snapshot).map_err(|source| SnapshotError::Format {
        path: path.clone(),
        source,
    })?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&tmp, bytes).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("rename", &path))
}

pub fn read_state(dir: &Path) -> Result<VmSnapshot, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io("read", &path))?;
    let snapshot: VmSnapshot =
        format::decode(&bytes).map_err(|source| SnapshotError::Format { path, source })?;
    check_consistency(&snapshot)?;
    Ok(snapshot)
}

/// What the decoder cannot know: the parts must agree with each other.
fn check_consistency(s: &VmSnapshot) -> Result<(), SnapshotError> {
    let bad = |what: String| Err(SnapshotError::Inconsistent(what));
    if s.vcpus.len() != usize::from(s.config.cpus) {
        return bad(format!(
            "{} vCPU states for {} vCPUs",
            s.vcpus.len(),
            s.config.cpus
        ));
    }
    if s.vcpus
        .iter()
        .enumerate()
        .any(|(i, v)| usize::from(v.id) != i)
    {
        return bad("vCPU states out of order".into());
    }
    if s.devices.len() != s.config.virtio_devices() {
        return bad(format!(
            "{} device states for {} devices",
            s.devices.len(),
            s.config.virtio_devices()
        ));
    }
    let ram: u64 = s.memory.iter().map(|r| r.size).sum();
    if ram != s.config.memory_bytes() {
        return bad(format!(
            "{ram} bytes of RAM regions for {} MiB",
            s.config.memory_mib
        ));
    }
    // An fd number is the saving process's; a file naming one is not one we wrote.
    if s.config
        .nets
        .iter()
        .any(|n| matches!(n.tap, TapSource::Fd(_)))
    {
        return bad("a network device has a TAP fd".into());
    }
    if let Err(e) = s.config.validate() {
        return bad(e.to_string());
    }
    Ok(())
}

/// Refuses a snapshot whose boot files are not the ones `expect` names.
pub fn check_boot_files(s: &VmSnapshot, expect: &VmConfig) -> Result<(), SnapshotError> {
    let current = BootFiles::of(expect).map_err(io("read", &expect.kernel))?;
    let pairs = [
        ("kernel", Some(&s.boot_files.kernel), Some(&current.kernel)),
        (
            "initramfs",
            s.boot_files.initrd.as_ref(),
            current.initrd.as_ref(),
        ),
    ];
    for (what, snapshot, current) in pairs {
        match (snapshot, current) {
            (Some(a), Some(b)) if a.matches(b) => {}
            (None, None) => {}
            (a, b) => {
                let none = || FileIdentity {
                    path: "(none)".into(),
                    len: 0,
                    modified_ns: 0,
                };
                let (a, b) = (
                    a.cloned().unwrap_or_else(none),
                    b.cloned().unwrap_or_else(none),
                );
                return Err(SnapshotError::BootFiles {
                    what,
                    snapshot: a.path,
                    snapshot_len: a.len,
                    current: b.path,
                    current_len: b.len,
                });
            }
        }
    }
    Ok(())
}

/// The configuration of the VM a restore makes: the snapshot's, with the overrides applied.
pub fn restored_config(s: &VmSnapshot, restore: &RestoreConfig) -> Result<VmConfig, SnapshotError> {
    let mut config = s.config.clone();
    for (id, disk) in &restore.overrides.disks {
        let index = id
            .strip_prefix("block")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n < config.disks.len())
            .ok_or_else(|| {
                SnapshotError::Inconsistent(format!("no disk {id} in the snapshot to replace"))
            })?;
        config.disks[index] = disk.clone();
    }
    if let Some(uds) = &restore.overrides.vsock_uds {
        match config.vsock.as_mut() {
            Some(vsock) => vsock.uds = uds.clone(),
            None => {
                return Err(SnapshotError::Inconsistent(
                    "the snapshot has no vsock device to move".into(),
                ));
            }
        }
    }
    for (id, net) in &restore.overrides.nets {
        let index = id
            .strip_prefix("net")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n < config.nets.len())
            .ok_or_else(|| {
                SnapshotError::Inconsistent(format!(
                    "no network device {id} in the snapshot to move"
                ))
            })?;
        config.nets[index] = net.clone();
    }
    if let Some(console) = &restore.console {
        config.console = console.clone();
    }
    Ok(config)
}
