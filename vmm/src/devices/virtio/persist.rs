//! Snapshot state of a virtio-mmio transport and its device, the restore that rebuilds them,
//! and swapping a block device's disk under a running guest.
//!
//! The state types are ours (not virtio-queue's `QueueState`), so the snapshot format only
//! changes when we change it. A snapshot file is untrusted input: a restore checks every field
//! the way the transport checks the guest's register writes, before it opens anything on the
//! host, and refuses what the transport could never have reached.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use super::block::persist::BlockState;
use super::block::{Disk, DiskError};
use super::fs::persist::FsState;
use super::mmio::MmioTransport;
use super::net::persist::NetState;
use super::net::tap::{Tap, TapError};
use super::rng::persist::RngState;
use super::vsock::persist::VsockState;
use super::{
    INT_CONFIG_CHANGE, INT_USED_RING, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, status,
};
use crate::config::{DiskConfig, NetConfig, TapSource};

/// The device behind a transport, by kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DeviceState {
    Block(BlockState),
    Net(NetState),
    Vsock(VsockState),
    Rng(RngState),
    Fs(FsState),
}

impl DeviceState {
    /// The registry's name for the kind (`block` in `block0`).
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::Block(_) => "block",
            DeviceState::Net(_) => "net",
            DeviceState::Vsock(_) => "vsock",
            DeviceState::Rng(_) => "rng",
            DeviceState::Fs(_) => "fs",
        }
    }

    /// The queue sizes such a device declares, known before anything is opened.
    fn queue_max_sizes(&self) -> &'static [u16] {
        match self {
            DeviceState::Block(_) => &[super::block::device::QUEUE_SIZE],
            DeviceState::Net(_) => &[super::net::device::QUEUE_SIZE; 2],
            DeviceState::Vsock(_) => &[super::vsock::device::QUEUE_SIZE; 3],
            DeviceState::Rng(_) => &[super::rng::device::QUEUE_SIZE],
            DeviceState::Fs(_) => &super::fs::device::QUEUE_SIZES,
        }
    }

    /// The features such a device offers.
    fn features(&self) -> u64 {
        match self {
            DeviceState::Block(b) => super::block::device::features(b.read_only_offered),
            DeviceState::Net(_) => super::net::device::FEATURES,
            DeviceState::Vsock(_) | DeviceState::Rng(_) | DeviceState::Fs(_) => VIRTIO_F_VERSION_1,
        }
    }
}

/// One virtqueue as the driver set it up and the device has used it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl QueueSnapshot {
    fn save(q: &Queue) -> QueueSnapshot {
        QueueSnapshot {
            max_size: q.max_size(),
            size: q.size(),
            ready: q.ready(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx_enabled: q.event_idx_enabled(),
        }
    }

    /// The queue, for a device whose queue this is declares `max_size`.
    fn restore(&self, max_size: u16) -> Result<Queue, String> {
        if self.max_size != max_size {
            return Err(format!(
                "largest size {} where the device has {max_size}",
                self.max_size
            ));
        }
        if self.event_idx_enabled {
            // No cocoon device offers VIRTIO_F_RING_EVENT_IDX.
            return Err("event index is on, which no cocoon device offers".into());
        }
        // virtio-queue checks the size (a power of two, at most the maximum) and the rings'
        // alignment.
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("size {} or ring addresses refused: {e}", self.size))
    }
}

/// A virtio-mmio transport with its device, as a snapshot keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransportState {
    pub device: DeviceState,
    pub queues: Vec<QueueSnapshot>,
    pub queue_select: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub driver_features: u64,
    /// The device status register (`status::*` bits).
    pub status: u32,
    /// The device accepted DRIVER_OK and serves its queues.
    pub activated: bool,
    /// `InterruptStatus` bits not yet acknowledged by the driver.
    pub interrupt_status: u32,
    pub config_generation: u32,
}

/// What a restore may change: per-device-id overrides.
#[derive(Debug, Clone, Default)]
pub struct DeviceOverrides {
    /// By registry id (`block0`, ...): another backing file, ro or rw.
    pub disks: BTreeMap<String, DiskConfig>,
    /// Where the vsock device listens instead of the saved path.
    pub vsock_uds: Option<PathBuf>,
    /// By registry id (`net0`, ...): another host side, a TAP by name or fd or none (the MAC
    /// must stay the guest's).
    pub nets: BTreeMap<String, NetConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("device id {0:?} names no known device kind (block, net, vsock, rng, fs)")]
    UnknownId(String),
    #[error("device {id}: the snapshot holds a {found} device where the id says {expected}")]
    KindMismatch {
        id: String,
        expected: String,
        found: &'static str,
    },
    #[error("device {id}: a {what} override was given but {id} is a {found} device")]
    OverrideMismatch {
        id: String,
        what: &'static str,
        found: &'static str,
    },
    #[error("device {id}: the snapshot has {found} queues, the device has {expected}")]
    QueueCount {
        id: String,
        expected: usize,
        found: usize,
    },
    #[error("device {id} queue {index}: {reason}")]
    Queue {
        id: String,
        index: usize,
        reason: String,
    },
    #[error("device {id}: inconsistent transport state: {reason}")]
    Transport { id: String, reason: String },
    #[error("device {id}: {reason}")]
    Device { id: String, reason: String },
    #[error("device {id}: {source}")]
    Disk { id: String, source: DiskError },
    #[error("device {id}: {source}")]
    Tap { id: String, source: TapError },
    #[error("device {id}: cannot {what}: {source}")]
    Io {
        id: String,
        what: String,
        source: std::io::Error,
    },
}

/// Why a disk swap failed; the caller knows which device it asked for.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("not a block device (virtio device type {0}): only disks can be swapped")]
    NotBlock(u32),
    #[error(transparent)]
    Disk(#[from] DiskError),
}

/// Why a TAP could not be given to a NIC; the caller knows which device it asked for.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("not a network device (virtio device type {0}): only NICs take a TAP")]
    NotNet(u32),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot watch the TAP: {0}")]
    Watch(std::io::Error),
}

/// Why a share could not be added; the caller knows which device it asked for.
#[derive(Debug, thiserror::Error)]
pub enum ShareAddError {
    #[error("not a virtio-fs device (virtio device type {0}): only it takes shares")]
    NotFs(u32),
    #[error(transparent)]
    Fs(#[from] super::fs::FsError),
}

/// `block` for `block0`; `None` for an id without a kind and an index.
fn id_kind(id: &str) -> Option<&str> {
    let kind = id.trim_end_matches(|c: char| c.is_ascii_digit());
    (!kind.is_empty() && kind.len() < id.len()).then_some(kind)
}

const KNOWN_STATUS: u32 = status::ACKNOWLEDGE
    | status::DRIVER
    | status::DRIVER_OK
    | status::FEATURES_OK
    | status::DEVICE_NEEDS_RESET
    | status::FAILED;

impl TransportState {
    /// Checks everything the device's kind alone decides, and builds the queues; nothing on the
    /// host is touched yet.
    fn check(&self, id: &str, mem: &GuestMemoryMmap) -> Result<Vec<Queue>, PersistError> {
        let transport_err = |reason: String| PersistError::Transport {
            id: id.into(),
            reason,
        };
        let max_sizes = self.device.queue_max_sizes();
        if self.queues.len() != max_sizes.len() {
            return Err(PersistError::QueueCount {
                id: id.into(),
                expected: max_sizes.len(),
                found: self.queues.len(),
            });
        }
        let queues = self
            .queues
            .iter()
            .zip(max_sizes)
            .enumerate()
            .map(|(index, (q, &max))| {
                q.restore(max).map_err(|reason| PersistError::Queue {
                    id: id.into(),
                    index,
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        if self.status & !KNOWN_STATUS != 0 {
            return Err(transport_err(format!(
                "status {:#x} has unknown bits",
                self.status
            )));
        }
        let negotiated = self.status & status::FEATURES_OK != 0;
        let driver_ok = self.status & status::DRIVER_OK != 0;
        if negotiated {
            let offered = self.device.features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                return Err(transport_err(format!(
                    "accepted features {:#x} are not a modern subset of the offered {offered:#x}",
                    self.driver_features
                )));
            }
        }
        // The transport activates exactly on DRIVER_OK after FEATURES_OK, unless a ring was
        // outside guest memory, which sets DEVICE_NEEDS_RESET instead.
        let should_be_active =
            negotiated && driver_ok && self.status & status::DEVICE_NEEDS_RESET == 0;
        if self.activated != should_be_active {
            return Err(transport_err(format!(
                "status {:#x} and activated={} disagree",
                self.status, self.activated
            )));
        }
        if self.activated {
            for (index, q) in queues.iter().enumerate() {
                if q.ready() && !q.is_valid(mem) {
                    return Err(PersistError::Queue {
                        id: id.into(),
                        index,
                        reason: "rings outside guest memory on an activated device".into(),
                    });
                }
            }
        }
        if self.interrupt_status & !(INT_USED_RING | INT_CONFIG_CHANGE) != 0 {
            return Err(transport_err(format!(
                "interrupt status {:#x} has unknown bits",
                self.interrupt_status
            )));
        }
        Ok(queues)
    }
}

impl MmioTransport {
    /// The transport and its device as a snapshot keeps them. Called with the VM paused and
    /// the transport's lock held, so no chain is half served.
    pub fn save(&self) -> TransportState {
        TransportState {
            device: self.device.save(),
            queues: self.queues.iter().map(QueueSnapshot::save).collect(),
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            status: self.status,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
        }
    }

    /// Rebuilds the transport of device `id` from `state`, reopening the device's host side
    /// (its disk, TAP or Unix socket) as saved or as `overrides` say. Refuses a state the
    /// transport could not have reached, before anything is opened.
    pub fn restore(
        id: &str,
        state: TransportState,
        overrides: &DeviceOverrides,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<MmioTransport, PersistError> {
        let kind = id_kind(id).ok_or_else(|| PersistError::UnknownId(id.into()))?;
        if !["block", "net", "vsock", "rng", "fs"].contains(&kind) {
            return Err(PersistError::UnknownId(id.into()));
        }
        if state.device.kind() != kind {
            return Err(PersistError::KindMismatch {
                id: id.into(),
                expected: kind.into(),
                found: state.device.kind(),
            });
        }
        for (what, given, wanted) in [
            ("disk", overrides.disks.contains_key(id), "block"),
            ("network", overrides.nets.contains_key(id), "net"),
        ] {
            if given && kind != wanted {
                return Err(PersistError::OverrideMismatch {
                    id: id.into(),
                    what,
                    found: state.device.kind(),
                });
            }
        }
        let queues = state.check(id, &mem)?;

        let mut capacity_changed = false;
        let device: Box<dyn VirtioDevice> = match &state.device {
            DeviceState::Block(s) => {
                let (block, changed) = s.restore(id, overrides.disks.get(id))?;
                capacity_changed = changed;
                Box::new(block)
            }
            DeviceState::Net(s) => {
                // The driver's offloads apply to the new TAP only once it had accepted them.
                let features = if state.activated {
                    state.driver_features
                } else {
                    0
                };
                Box::new(s.restore(id, overrides.nets.get(id), features)?)
            }
            DeviceState::Vsock(s) => Box::new(s.restore(id, overrides.vsock_uds.as_deref())?),
            DeviceState::Rng(s) => Box::new(s.restore()),
            DeviceState::Fs(s) => Box::new(s.restore().map_err(|reason| PersistError::Device {
                id: id.into(),
                reason,
            })?),
        };
        // What `check` assumed of the kind must be what the device built says of itself.
        if device.queue_max_sizes() != state.device.queue_max_sizes()
            || device.features() != state.device.features()
        {
            return Err(PersistError::Device {
                id: id.into(),
                reason: "the restored device's queues or features differ from its kind's".into(),
            });
        }

        let mut interrupt_status = state.interrupt_status;
        let mut config_generation = state.config_generation;
        if capacity_changed {
            // The disk is not the size the guest knows: tell it as a swap would.
            config_generation = config_generation.wrapping_add(1);
            if state.status & status::DRIVER_OK != 0 {
                interrupt_status |= INT_CONFIG_CHANGE;
            }
        }
        interrupt.restore_status(interrupt_status);
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_select: state.queue_select,
            device_features_select: state.device_features_select,
            driver_features_select: state.driver_features_select,
            driver_features: state.driver_features,
            status: state.status,
            activated: state.activated,
            config_generation,
        })
    }

    /// Called once the VM's interrupt controllers are restored and before any vCPU runs. The
    /// device gets its say first (vsock tells the guest its transport was reset); then every
    /// ready queue is served once, because a kick the old process had not read from its
    /// ioeventfd when it was saved is gone; then an interrupt is raised if anything is waiting
    /// for the driver, including status bits set before the save whose interrupt the guest may
    /// not have taken. A spurious interrupt costs the guest one look at the status register.
    pub fn after_restore(&mut self) {
        if !self.activated {
            if self.interrupt.status() != 0 {
                self.interrupt.raise();
            }
            return;
        }
        let mut used = self.device.after_restore(&mut self.queues, &self.mem);
        for index in 0..self.queues.len() {
            if self.queues[index].ready() {
                used |= self
                    .device
                    .process_queue(index, &mut self.queues, &self.mem);
            }
        }
        if used {
            self.interrupt.signal_used_ring();
        } else if self.interrupt.status() != 0 {
            self.interrupt.raise();
        }
    }

    /// Replaces a block device's backing file under a running guest and tells the driver: new
    /// capacity in config space, the config generation bumped, INT_CONFIG_CHANGE raised (Linux
    /// virtio-blk re-reads the capacity and resizes the disk). The features the driver
    /// accepted stay: a read-only image swapped in for a writable one fails the guest's writes
    /// with IOERR instead of turning the disk read-only under it.
    pub fn swap_disk(&mut self, disk: DiskConfig) -> Result<(), SwapError> {
        let device_type = self.device.device_type();
        let Some(block) = self.device.as_block_mut() else {
            return Err(SwapError::NotBlock(device_type));
        };
        let new = Disk::open_replacing(&disk.path, disk.read_only, block.disk())?;
        let old = block.replace_disk(new);
        tracing::info!(
            from = %old.path().display(),
            to = %disk.path.display(),
            sectors = block.disk().capacity(),
            "disk swapped"
        );
        drop(old);
        self.config_generation = self.config_generation.wrapping_add(1);
        // Before DRIVER_OK the driver reads the capacity when it gets there.
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt.signal_config_change();
        }
        Ok(())
    }

    /// Gives a NIC `tap` as its host side under a running guest (a detached NIC of a VM
    /// restored from a template, once the engine has made the container's network). The driver
    /// sees no change: frames start to flow, with the offloads it negotiated. `None` detaches.
    pub fn attach_tap(&mut self, tap: &TapSource) -> Result<(), AttachError> {
        let device_type = self.device.device_type();
        let Some(net) = self.device.as_net_mut() else {
            return Err(AttachError::NotNet(device_type));
        };
        match Tap::from_source(tap)? {
            Some(tap) => net.attach(tap).map_err(AttachError::Watch)?,
            None => net.detach(),
        }
        Ok(())
    }

    /// Adds a share to a virtio-fs device under a running guest: it appears in the root of
    /// the guest's mount at its next lookup.
    pub fn add_share(&mut self, share: super::fs::Share) -> Result<(), ShareAddError> {
        let device_type = self.device.device_type();
        let Some(fs) = self.device.as_fs_mut() else {
            return Err(ShareAddError::NotFs(device_type));
        };
        fs.add_share(share)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
