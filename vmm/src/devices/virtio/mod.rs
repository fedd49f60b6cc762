//! virtio devices and their transport (virtio-mmio, virtio 1.x only).
//!
//! A device implements [`VirtioDevice`]: what it offers (type, features, queues, config space)
//! and how it serves one of its queues. The transport owns the queues and the feature and status
//! handshake, so devices only ever see queues the driver has set up and the device activated.

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod rng;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Feature bit every cocoon device offers and requires: virtio 1.x ("modern") semantics.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// Interrupt status bits (virtio-mmio `InterruptStatus`).
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// A device's interrupt line: the status bits the driver reads and acknowledges, and the irqfd
/// that raises the IOAPIC pin.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Tells the driver that used buffers are waiting.
    pub fn signal_used_ring(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        self.raise();
    }

    /// Tells the driver the device's configuration space changed (virtio-blk re-reads its
    /// capacity on this).
    pub fn signal_config_change(&self) {
        self.status.fetch_or(INT_CONFIG_CHANGE, Ordering::SeqCst);
        self.raise();
    }

    /// Pulses the line without touching the status bits: after a restore, for bits the old
    /// process set but whose interrupt the guest may never have seen.
    pub fn raise(&self) {
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("cannot raise virtio interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets the status bits a snapshot recorded (the caller has checked them).
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// What a virtio device implements; the transport does the rest.
pub trait VirtioDevice: Send {
    /// Device type (virtio 1.x, 5): 2 for block, ...
    fn device_type(&self) -> u32;
    /// One entry per queue: its largest size.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Reads from the device-specific configuration space. Out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the configuration space. Most devices ignore them.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver accepted `features` and set DRIVER_OK; queues are ready.
    fn activate(&mut self, _features: u64) {}
    /// The driver kicked queue `index`: serve it (a device may use its other queues too, e.g.
    /// to answer on its receive queue). Returns whether any chain was returned to a used ring
    /// (so the transport decides whether to interrupt).
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool;
    /// A pollable fd for the device's host side (a socket, or the device's own epoll of many),
    /// watched by the device thread.
    fn host_event_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// `host_event_fd` is readable. Same return as `process_queue`.
    fn process_host_events(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> bool {
        false
    }
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// The VM has ended: no guest will answer any more. A device whose host side has peers
    /// waiting on the guest lets them go, so they see the end instead of waiting for ever.
    fn vm_ended(&mut self) {}
    /// What a snapshot keeps of the device, enough to reopen its host side (`persist.rs`).
    fn save(&self) -> persist::DeviceState;
    /// The device restored from a snapshot may now talk to the driver (the interrupt
    /// controller is restored, no vCPU runs yet). Same return as `process_queue`.
    fn after_restore(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> bool {
        false
    }
    /// The block device behind this trait object, so a disk can be swapped through the
    /// transport; `None` for every other kind.
    fn as_block_mut(&mut self) -> Option<&mut block::Block> {
        None
    }
    /// The network device behind this trait object, so a TAP can be given to a NIC through the
    /// transport; `None` for every other kind.
    fn as_net_mut(&mut self) -> Option<&mut net::Net> {
        None
    }
    /// The virtio-fs device behind this trait object, so a share can be added through the
    /// transport; `None` for every other kind.
    fn as_fs_mut(&mut self) -> Option<&mut fs::Fs> {
        None
    }
}

/// Copies the part of a device's configuration space at `offset` into `data`; bytes past the
/// end (or an absurd offset) read as zero.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// Most chains one pass of [`serve_chains`] serves. A guest can make a queue endless: rings
/// that overlap, or a buffer the device writes that covers the avail ring, let every chain
/// served announce another. The bound is far above what a guest supplies while one pass runs
/// (a ring holds at most 256 chains here), so only such a ring meets it; what is left waits,
/// with notifications on, for the guest's next kick. (A per-wakeup budget that serves the rest
/// after the other queues is the parked device-budget work, see docs/security.md.)
pub const MAX_CHAINS_PER_PASS: usize = 4096;

/// Serves every available chain of `queue` with `serve` (which returns the used length), with
/// guest notifications off while we work and a last look after turning them back on, so a kick
/// that raced with us is not lost. Returns whether any chain was used. A ring the guest broke
/// after activation ends the pass quietly (an avail index that stays ahead of what the ring
/// yields included); one that never runs dry ends it after [`MAX_CHAINS_PER_PASS`], with
/// notifications on.
pub fn serve_chains(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut serve: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> bool {
    let mut used_any = false;
    let mut served = 0;
    // Rounds in a row that found no chain: a second one means the avail index announces
    // chains the ring cannot give (an index too far ahead), not a kick that raced with us.
    let mut empty_rounds = 0;
    loop {
        if queue.disable_notification(mem).is_err() {
            return used_any;
        }
        let served_before = served;
        while served < MAX_CHAINS_PER_PASS
            && let Some(chain) = queue.pop_descriptor_chain(mem)
        {
            served += 1;
            let head = chain.head_index();
            let len = serve(chain);
            if queue.add_used(mem, head, len).is_err() {
                return used_any;
            }
            used_any = true;
        }
        if served == MAX_CHAINS_PER_PASS {
            // What is left stays available for the next pass.
            let _ = queue.enable_notification(mem);
            return used_any;
        }
        empty_rounds = if served == served_before {
            empty_rounds + 1
        } else {
            0
        };
        match queue.enable_notification(mem) {
            Ok(true) if empty_rounds < 2 => continue,
            _ => return used_any,
        }
    }
}
