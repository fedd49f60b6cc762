//! Every device of a VM, kept by the VM handle after the build so later work (snapshots, disk
//! swaps, hot-unplug) can reach a device without the buses.
//!
//! Virtio devices are named by kind and index in the order the guest sees them: `block0`,
//! `block1`, ... (the `--disk`s in order: `/dev/vda`, `/dev/vdb`, ...), `rng0`, `vsock0`,
//! `net0`. The names are stable for a configuration: the same flags give the same names.

use std::sync::{Arc, Mutex};

use crate::devices::guest_status::GuestStatus;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::SerialConsole;
use crate::devices::virtio::mmio::MmioTransport;

pub struct Devices {
    /// In the order of their MMIO windows (and IRQs).
    virtio: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    /// COM1, absent with `--console off`.
    pub serial: Option<Arc<Mutex<SerialConsole>>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub guest_status: Arc<Mutex<GuestStatus>>,
}

impl Devices {
    pub fn new(
        serial: Option<Arc<Mutex<SerialConsole>>>,
        i8042: Arc<Mutex<I8042>>,
        guest_status: Arc<Mutex<GuestStatus>>,
    ) -> Self {
        Devices {
            virtio: Vec::new(),
            serial,
            i8042,
            guest_status,
        }
    }

    /// The id the next virtio device of `kind` gets: `kind` followed by how many of that kind
    /// came before it.
    pub fn next_id(&self, kind: &str) -> String {
        let n = self
            .virtio
            .iter()
            .filter(|(id, _)| {
                id.strip_prefix(kind)
                    .is_some_and(|n| n.parse::<u32>().is_ok())
            })
            .count();
        format!("{kind}{n}")
    }

    pub fn add_virtio(&mut self, id: String, transport: Arc<Mutex<MmioTransport>>) {
        self.virtio.push((id, transport));
    }

    /// The virtio transport (and through it the device) called `id`.
    pub fn get(&self, id: &str) -> Option<&Arc<Mutex<MmioTransport>>> {
        self.virtio.iter().find(|(i, _)| i == id).map(|(_, t)| t)
    }

    /// The virtio devices' ids, in the order the guest sees them.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.virtio.iter().map(|(id, _)| id.as_str())
    }

    /// Every virtio transport with its id.
    pub fn virtio(&self) -> impl Iterator<Item = (&str, &Arc<Mutex<MmioTransport>>)> {
        self.virtio.iter().map(|(id, t)| (id.as_str(), t))
    }
}
