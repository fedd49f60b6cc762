//! The network device: RX and TX queues moving frames (with their virtio-net header) between the
//! guest and a TAP. The TAP is read edge-triggered, and only while the guest has RX buffers; a
//! frame read with no room for it yet waits for the guest's next buffers.
//!
//! Checksum and TCP segmentation offloads are offered both ways, so the guest kernel (emulated,
//! and so slow, on a PVM host) neither checksums nor segments: the host kernel does, natively.
//! With mergeable RX buffers a 64 KiB frame from the TAP spans several of the guest's buffers.
//! Since every frame costs the guest about the same whatever its size, consecutive TCP segments
//! are merged while the guest is busy (`coalesce.rs`), and a driver polling its ring (NAPI) is
//! not interrupted.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::coalesce::{self, Merged};
use super::header::{NUM_BUFFERS_OFFSET, VNET_HDR_SIZE, check_tx, fit_rx};
use super::persist::NetState;
use super::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, Tap};
use crate::devices::virtio::persist::DeviceState;
use crate::devices::virtio::{VIRTIO_F_VERSION_1, VirtioDevice, read_config_space, serve_chains};

pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const QUEUE_SIZE: u16 = 256;
/// The features a network device offers. No ECN or UDP offloads (the TAP is never asked for
/// them, and guest frames using them are dropped), no control queue, no event index.
pub const FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_MRG_RXBUF;
/// Largest frame with its header we move: a 64 KiB GSO packet behind its Ethernet header.
pub const MAX_FRAME: usize = VNET_HDR_SIZE + 14 + 65536;

/// How often a merged frame held while the guest polls its ring is looked at again.
const HOLD_RECHECK: Duration = Duration::from_micros(250);
/// The longest a merged frame is held, for a driver that leaves interrupts off while idle. (A
/// Linux guest on a PVM host polls for several milliseconds per frame when busy.)
const MAX_HOLD: Duration = Duration::from_millis(20);
/// Epoll tokens of the device's host side.
const TOKEN_TAP: u64 = 0;
const TOKEN_TIMER: u64 = 1;

/// Per-device counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetMetrics {
    /// Frames given to the guest (a merged frame counts once).
    pub rx_frames: u64,
    /// TAP frames merged into the frame before them (see `coalesce.rs`).
    pub rx_merged: u64,
    pub tx_frames: u64,
    /// Guest frames refused: bad chains or headers.
    pub bad_tx: u64,
    /// Good guest frames with nowhere to go: a detached NIC, a full TAP.
    pub tx_dropped: u64,
    pub rx_dropped: u64,
}

/// What became of a frame offered to the RX queue.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    /// In the guest's buffers, used entries published.
    Delivered,
    /// Not enough buffers yet: the frame waits, no buffer was taken.
    NoRoom,
    /// Dropped; `used` says whether buffers were returned (with nothing in them).
    Dropped { used: bool },
}

/// Reused between frames: the RX chains one frame takes.
#[derive(Default)]
struct RxChains {
    /// (head, first descriptor in `descs`, end).
    chains: Vec<(u16, usize, usize)>,
    descs: Vec<Descriptor>,
    /// The used entries (head, length) of the frame.
    used: Vec<(u16, u32)>,
}

pub struct Net {
    tap: Option<Tap>,
    mac: [u8; 6],
    epoll: Epoll,
    /// Wakes the device while a merged frame is held (see `receive`).
    timer: File,
    /// The features the driver accepted (0 until it activates the device).
    features: u64,
    /// One frame's worth, reused: the frame read last from the TAP, until it is delivered or
    /// merged.
    rx_buf: Vec<u8>,
    /// The length of the frame in `rx_buf`, if one waits.
    rx_pending: Option<usize>,
    /// TAP frames being merged, and since when (they are held while the guest polls).
    merged: Option<(Merged, Instant)>,
    /// A merged frame finished and waiting for RX buffers; it goes before `rx_pending`.
    merged_ready: Option<Vec<u8>>,
    /// The buffer of the last merged frame, for the next.
    merge_spare: Vec<u8>,
    /// Edge-triggered: the TAP may hold frames we have not read.
    tap_readable: bool,
    /// A guest frame being gathered, reused.
    tx_buf: Vec<u8>,
    rx_chains: RxChains,
    queue_sizes: [u16; 2],
    pub metrics: NetMetrics,
}

impl Net {
    /// A NIC on `tap`, or detached with `None`.
    pub fn new(tap: Option<Tap>, mac: [u8; 6]) -> std::io::Result<Net> {
        let epoll = Epoll::new()?;
        // SAFETY: timerfd_create takes no pointers; on success we own the new descriptor.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor we just created and nothing else owns.
        let timer = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_TIMER),
        )?;
        let mut net = Net {
            tap: None,
            mac,
            epoll,
            timer,
            features: 0,
            rx_buf: vec![0u8; MAX_FRAME],
            rx_pending: None,
            merged: None,
            merged_ready: None,
            merge_spare: Vec::new(),
            tap_readable: false,
            tx_buf: vec![0u8; MAX_FRAME],
            rx_chains: RxChains::default(),
            queue_sizes: [QUEUE_SIZE; 2],
            metrics: NetMetrics::default(),
        };
        if let Some(tap) = tap {
            net.attach(tap)?;
        }
        Ok(net)
    }

    /// Gives the NIC `tap` as its host side (replacing any other), with the offloads the driver
    /// accepted if it has already.
    pub fn attach(&mut self, tap: Tap) -> std::io::Result<()> {
        self.detach();
        self.epoll.ctl(
            ControlOperation::Add,
            tap.file.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_TAP),
        )?;
        self.tap = Some(tap);
        self.tap_readable = true;
        self.apply_offloads();
        Ok(())
    }

    /// Drops the host side: frames the guest sends from now on are counted and dropped.
    pub fn detach(&mut self) {
        if let Some(old) = self.tap.take() {
            // The old fd's description may live on (the caller's dup): it must leave our epoll.
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                old.file.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.tap_readable = false;
    }

    /// The TAP's interface name, `None` when detached.
    pub fn tap_name(&self) -> Option<&str> {
        self.tap.as_ref().map(|t| t.name.as_str())
    }

    pub(super) fn tap(&self) -> Option<&Tap> {
        self.tap.as_ref()
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The features a restored driver had accepted: as `activate` would take them.
    pub(super) fn restore_features(&mut self, features: u64) {
        self.features = features;
        self.apply_offloads();
    }

    /// Has the TAP hand us only the offloaded frames the guest accepted.
    fn apply_offloads(&self) {
        let Some(tap) = &self.tap else {
            return;
        };
        let flags = tun_offloads(self.features);
        if let Err(e) = tap.set_offload(flags) {
            // The TAP then hands us fewer offloaded frames, which is slower, not wrong.
            tracing::warn!(
                "virtio-net: TAP {}: TUNSETOFFLOAD {flags:#x}: {e}",
                tap.name
            );
        }
    }

    /// Frames from the TAP are merged for a guest that takes TCPv4 GSO frames.
    fn coalescing(&self) -> bool {
        let needed = VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4;
        self.features & needed == needed
    }

    /// Drops every frame on its way to the guest (a reset, a new driver).
    fn drop_rx(&mut self) {
        self.rx_pending = None;
        self.merged = None;
        self.merged_ready = None;
    }

    /// Writes one guest frame (header included) to the TAP; bad chains and headers are dropped.
    fn transmit(&mut self, mem: &GuestMemoryMmap, chain: impl Iterator<Item = Descriptor>) {
        let mut len = 0usize;
        for desc in chain {
            let n = desc.len() as usize;
            if desc.is_write_only() || n > MAX_FRAME - len {
                self.metrics.bad_tx += 1;
                return;
            }
            if mem
                .read_slice(&mut self.tx_buf[len..len + n], desc.addr())
                .is_err()
            {
                self.metrics.bad_tx += 1;
                return;
            }
            len += n;
        }
        // Checked on our copy: the guest may rewrite its buffers meanwhile.
        let frame = &self.tx_buf[..len];
        if let Err(e) = check_tx(frame, self.features) {
            tracing::debug!("virtio-net: TX frame dropped: {e}");
            self.metrics.bad_tx += 1;
            return;
        }
        let Some(tap) = &self.tap else {
            self.metrics.tx_dropped += 1;
            return;
        };
        // A full TAP queue drops the frame, as a NIC would; TCP resends.
        // A TAP write is one whole frame or nothing.
        match (&tap.file).write(frame) {
            Ok(n) if n == frame.len() => self.metrics.tx_frames += 1,
            Ok(n) => {
                self.metrics.tx_dropped += 1;
                tracing::debug!("virtio-net: TAP {} took {n} of {len} bytes", tap.name);
            }
            Err(e) => {
                self.metrics.tx_dropped += 1;
                tracing::debug!("virtio-net: TAP {} write: {e}", tap.name);
            }
        }
    }

    /// Counts a delivery; whether buffers were used.
    fn count(&mut self, delivery: &Delivery) -> bool {
        match delivery {
            Delivery::Delivered => {
                self.metrics.rx_frames += 1;
                true
            }
            Delivery::Dropped { used } => {
                self.metrics.rx_dropped += 1;
                *used
            }
            Delivery::NoRoom => false,
        }
    }

    /// Finishes the frame being merged; it goes to the guest next.
    fn finish_merged(&mut self) {
        if let Some((merged, _)) = self.merged.take() {
            self.merged_ready = Some(merged.finish());
        }
    }

    /// Moves frames from the TAP into the guest's RX buffers while both have some, merging
    /// consecutive TCP segments on the way. A merged frame that could still grow is held while
    /// the TAP is empty and the guest's driver polls its ring (interrupts off): the guest is
    /// busy with earlier frames, and one more segment in this frame costs it far less than one
    /// more frame. When it stops polling (looked at every `HOLD_RECHECK`) the frame goes at
    /// once, so an idle guest gets every frame without delay.
    fn receive(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(rx) = queues.get_mut(RX_QUEUE) else {
            return false;
        };
        let mergeable = self.features & VIRTIO_NET_F_MRG_RXBUF != 0;
        let coalescing = self.coalescing();
        let mut used_any = false;
        loop {
            if let Some(mut frame) = self.merged_ready.take() {
                let delivery = deliver(&mut self.rx_chains, &mut frame, mergeable, rx, mem);
                if delivery == Delivery::NoRoom {
                    self.merged_ready = Some(frame);
                    break;
                }
                used_any |= self.count(&delivery);
                self.merge_spare = frame;
                continue;
            }
            if self.merged.as_ref().is_some_and(|(m, _)| m.ready) {
                self.finish_merged();
                continue;
            }
            if let Some(len) = self.rx_pending {
                let frame = &self.rx_buf[..len];
                if let Some(seg) = coalescing.then(|| coalesce::parse(frame)).flatten() {
                    match &mut self.merged {
                        None => {
                            let buf = std::mem::take(&mut self.merge_spare);
                            self.merged = Some((Merged::start(buf, frame, seg), Instant::now()));
                            self.rx_pending = None;
                        }
                        Some((merged, _)) => {
                            if merged.append(frame, seg) {
                                self.metrics.rx_merged += 1;
                                self.rx_pending = None;
                            } else {
                                self.finish_merged();
                            }
                        }
                    }
                    continue;
                }
                if self.merged.is_some() {
                    // In order: the frames merged so far came first.
                    self.finish_merged();
                    continue;
                }
                let delivery = deliver(
                    &mut self.rx_chains,
                    &mut self.rx_buf[..len],
                    mergeable,
                    rx,
                    mem,
                );
                if delivery == Delivery::NoRoom {
                    break;
                }
                used_any |= self.count(&delivery);
                self.rx_pending = None;
                continue;
            }
            if self.read_frame() {
                continue;
            }
            // The TAP is empty.
            if let Some((_, since)) = &self.merged {
                if driver_polling(rx, mem) && since.elapsed() < MAX_HOLD {
                    self.arm_timer(HOLD_RECHECK);
                    break;
                }
                self.finish_merged();
                continue;
            }
            break;
        }
        used_any
    }

    /// One-shot wake-up of the device thread after `after`.
    fn arm_timer(&self, after: Duration) {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: timerfd_settime reads the itimerspec we own; the old value is not asked for.
        if unsafe { libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) }
            < 0
        {
            // Without the timer, the next TAP frame or guest kick delivers the frame instead.
            tracing::warn!(
                "virtio-net: cannot arm the hold timer: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// Reads the next frame the guest may take from the TAP into `rx_buf`; false when there is
    /// none (or no TAP).
    fn read_frame(&mut self) -> bool {
        let Some(tap) = &self.tap else {
            return false;
        };
        while self.tap_readable {
            match (&tap.file).read(&mut self.rx_buf) {
                Ok(0) => self.tap_readable = false,
                Ok(n) => match fit_rx(&mut self.rx_buf[..n], self.features) {
                    Ok(()) => {
                        self.rx_pending = Some(n);
                        return true;
                    }
                    Err(e) => {
                        tracing::debug!("virtio-net: RX frame from TAP {} dropped: {e}", tap.name);
                        self.metrics.rx_dropped += 1;
                    }
                },
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => self.tap_readable = false,
            }
        }
        false
    }
}

/// Puts `frame` (virtio-net header first) into the guest's RX chains: one chain, or with
/// mergeable buffers as many as it takes, their used entries published at once with
/// `num_buffers` in the header. Without enough chains the frame waits and the chains stay
/// available.
fn deliver(
    scratch: &mut RxChains,
    frame: &mut [u8],
    mergeable: bool,
    rx: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Delivery {
    let len = frame.len();
    let start = rx.next_avail();
    scratch.chains.clear();
    scratch.descs.clear();
    let mut room = 0usize;
    let mut writable = true;
    while room < len {
        if scratch.chains.len() >= usize::from(rx.size())
            || (!mergeable && !scratch.chains.is_empty())
        {
            // The whole ring (or the one chain allowed) is too small for it: never room.
            rx.set_next_avail(start);
            return Delivery::Dropped { used: false };
        }
        let Some(chain) = rx.pop_descriptor_chain(mem) else {
            rx.set_next_avail(start);
            return Delivery::NoRoom;
        };
        let head = chain.head_index();
        let first = scratch.descs.len();
        for desc in chain {
            writable &= desc.is_write_only();
            room = room.saturating_add(desc.len() as usize);
            scratch.descs.push(desc);
        }
        scratch.chains.push((head, first, scratch.descs.len()));
        if !writable {
            break;
        }
    }
    let count = scratch.chains.len();
    if frame.len() >= NUM_BUFFERS_OFFSET + 2 {
        // `count` is at most the queue size, a u16.
        frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
            .copy_from_slice(&(count as u16).to_le_bytes());
    }
    let mut written = 0usize;
    let mut ok = writable;
    scratch.used.clear();
    for &(head, first, end) in &scratch.chains {
        let chain_start = written;
        for desc in &scratch.descs[first..end] {
            if !ok || written == len {
                break;
            }
            let n = (desc.len() as usize).min(len - written);
            if mem
                .write_slice(&frame[written..written + n], desc.addr())
                .is_err()
            {
                ok = false;
                break;
            }
            written += n;
        }
        scratch.used.push((head, (written - chain_start) as u32));
    }
    if !ok {
        // A chain the device cannot write: every chain taken goes back empty (a driver
        // drops an entry shorter than a header).
        scratch.used.iter_mut().for_each(|u| u.1 = 0);
    }
    let published = publish_used(rx, mem, &scratch.used);
    match (ok, published) {
        (true, true) => Delivery::Delivered,
        (_, published) => Delivery::Dropped { used: published },
    }
}

/// The `TUN_F_*` offloads matching the driver's `features`: only what it takes on receive.
pub fn tun_offloads(features: u64) -> u32 {
    if features & VIRTIO_NET_F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if features & VIRTIO_NET_F_GUEST_TSO4 != 0 {
        flags |= TUN_F_TSO4;
    }
    if features & VIRTIO_NET_F_GUEST_TSO6 != 0 {
        flags |= TUN_F_TSO6;
    }
    flags
}

/// Writes the used-ring entries `used` (head, length) and only then the used index, so the
/// driver sees all of a frame's buffers at once (Linux drops a merged frame whose later buffers
/// are not there yet). False if the ring cannot be written.
fn publish_used(rx: &mut Queue, mem: &GuestMemoryMmap, used: &[(u16, u32)]) -> bool {
    let size = rx.size();
    let ring = GuestAddress(rx.used_ring());
    let mut next = rx.next_used();
    for &(head, len) in used {
        if head >= size {
            return false;
        }
        let slot = 4 + 8 * u64::from(next % size);
        let Some(at) = ring.checked_add(slot) else {
            return false;
        };
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        if mem.write_slice(&elem, at).is_err() {
            return false;
        }
        next = next.wrapping_add(1);
    }
    // Release: the entries (and the frame's bytes) are visible before the index that covers them.
    let Some(idx) = ring.checked_add(2) else {
        return false;
    };
    if mem.store(next.to_le(), idx, Ordering::Release).is_err() {
        return false;
    }
    rx.set_next_used(next);
    true
}

/// Whether the driver wants an interrupt for new used entries of `queue`: not while it has
/// `VIRTQ_AVAIL_F_NO_INTERRUPT` set, as Linux does while NAPI polls the ring (virtio 1.x 2.7.7;
/// virtio-queue's `needs_notification` ignores the flag). On a PVM host every interrupt costs
/// the guest its IRQ path in emulated code and two MMIO exits, for nothing while it polls.
fn wants_interrupt(queue: Option<&Queue>, mem: &GuestMemoryMmap) -> bool {
    queue.is_none_or(|q| !driver_polling(q, mem))
}

/// The driver has interrupts off for `queue` (`VIRTQ_AVAIL_F_NO_INTERRUPT`): it is polling the
/// ring and will see new used entries without one. A ring we cannot read counts as not.
fn driver_polling(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    // Our used index store before the flag load; the driver clears the flag, then reads the
    // used index (with a full barrier between): one of us sees the other's write.
    std::sync::atomic::fence(Ordering::SeqCst);
    mem.load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Acquire)
        .is_ok_and(|flags| u16::from_le(flags) & VIRTQ_AVAIL_F_NO_INTERRUPT != 0)
}

const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }
    fn as_net_mut(&mut self) -> Option<&mut Net> {
        Some(self)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    /// `struct virtio_net_config`: the MAC first; the rest is not offered.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.mac, offset, data);
    }

    fn activate(&mut self, features: u64) {
        tracing::debug!(
            "virtio-net: driver accepted features {features:#x}, TAP offloads {:#x}",
            tun_offloads(features)
        );
        self.features = features;
        self.apply_offloads();
    }

    fn reset(&mut self) {
        self.features = 0;
        self.drop_rx();
        self.apply_offloads();
    }

    /// Returns whether the driver wants an interrupt for what was used (see `wants_interrupt`).
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let mut tx_used = false;
        if index == TX_QUEUE
            && let Some(tx) = queues.get_mut(TX_QUEUE)
        {
            tx_used = serve_chains(tx, mem, |chain| {
                self.transmit(mem, chain);
                0
            });
        }
        let rx_used = self.receive(queues, mem);
        (tx_used && wants_interrupt(queues.get(TX_QUEUE), mem))
            || (rx_used && wants_interrupt(queues.get(RX_QUEUE), mem))
    }

    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_host_events(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let mut events = [EpollEvent::default(); 4];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        for event in &events[..n] {
            if event.data() == TOKEN_TIMER {
                let mut expirations = [0u8; 8];
                // Clears the (level-triggered) expiry; `receive` looks at the held frame.
                let _ = (&self.timer).read(&mut expirations);
            } else {
                self.tap_readable = true;
            }
        }
        self.receive(queues, mem) && wants_interrupt(queues.get(RX_QUEUE), mem)
    }

    fn save(&self) -> DeviceState {
        DeviceState::Net(NetState::save(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::request::tests::{F_WRITE, desc, mem};
    use crate::devices::virtio::net::header::{F_NEEDS_CSUM, GSO_TCPV4};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const MRG: u64 = FEATURES;
    const PLAIN: u64 = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC;

    fn detached(features: u64) -> Net {
        let mut net = Net::new(None, [2, 0, 0, 0, 0, 1]).unwrap();
        net.activate(features);
        net
    }

    /// Offers `frame` (header included) to the RX queue as `net` would.
    fn offer(net: &mut Net, rx: &mut Queue, m: &GuestMemoryMmap, frame: &[u8]) -> Delivery {
        let mergeable = net.features & VIRTIO_NET_F_MRG_RXBUF != 0;
        deliver(&mut net.rx_chains, &mut frame.to_vec(), mergeable, rx, m)
    }

    fn frame(len: usize) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        f[..VNET_HDR_SIZE].fill(0);
        f
    }

    fn used_idx(m: &GuestMemoryMmap, q: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
        m.read_obj(q.used_addr().unchecked_add(2)).unwrap()
    }

    fn used_elem(
        m: &GuestMemoryMmap,
        q: &MockSplitQueue<'_, GuestMemoryMmap>,
        i: u64,
    ) -> (u32, u32) {
        let at = q.used_addr().unchecked_add(4 + 8 * i);
        (
            m.read_obj(at).unwrap(),
            m.read_obj(at.unchecked_add(4)).unwrap(),
        )
    }

    /// `n` one-descriptor RX chains of `size` bytes each, at 0x10_0000 + i * 0x1_0000.
    fn buffers(n: u16, size: u32) -> Vec<RawDescriptor> {
        (0..n)
            .map(|i| desc(0x10_0000 + u64::from(i) * 0x1_0000, size, F_WRITE))
            .collect()
    }

    #[test]
    fn a_large_frame_spans_several_chains_published_at_once() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        q.add_desc_chains(&buffers(4, 1500), 0).unwrap();
        let mut rx: Queue = q.create_queue().unwrap();
        let mut net = detached(MRG);
        let f = frame(4000);
        assert_eq!(offer(&mut net, &mut rx, &m, &f), Delivery::Delivered);
        assert_eq!(used_idx(&m, &q), 3, "three chains, one index update");
        assert_eq!(rx.next_avail(), 3, "the fourth buffer stays available");
        assert_eq!(
            (0..3).map(|i| used_elem(&m, &q, i)).collect::<Vec<_>>(),
            vec![(0, 1500), (1, 1500), (2, 1000)]
        );
        let mut back = vec![0u8; 4000];
        for i in 0..3u64 {
            let n = if i == 2 { 1000 } else { 1500 };
            let at = i as usize * 1500;
            m.read_slice(
                &mut back[at..at + n],
                GuestAddress(0x10_0000 + i * 0x1_0000),
            )
            .unwrap();
        }
        assert_eq!(u16::from_le_bytes([back[10], back[11]]), 3, "num_buffers");
        assert_eq!(back[12..], f[12..]);
    }

    #[test]
    fn without_enough_chains_the_frame_waits_whole() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        q.add_desc_chains(&buffers(2, 1500), 0).unwrap();
        let mut rx: Queue = q.create_queue().unwrap();
        let mut net = detached(MRG);
        assert_eq!(offer(&mut net, &mut rx, &m, &frame(4000)), Delivery::NoRoom);
        assert_eq!(used_idx(&m, &q), 0, "nothing published");
        assert_eq!(rx.next_avail(), 0, "the chains were given back");
        // Through the device: the frame read from the TAP stays pending, whole.
        let f = frame(4000);
        net.rx_buf[..f.len()].copy_from_slice(&f);
        net.rx_pending = Some(f.len());
        let mut queues = [rx, q.create_queue().unwrap()];
        assert!(!net.receive(&mut queues, &m));
        assert_eq!(net.rx_pending, Some(4000));
        assert_eq!(used_idx(&m, &q), 0);
        // The guest adds a buffer: now it fits.
        q.add_desc_chains(&[desc(0x30_0000, 1500, F_WRITE)], 2)
            .unwrap();
        assert!(net.receive(&mut queues, &m));
        assert_eq!(net.rx_pending, None);
        assert_eq!(net.metrics.rx_frames, 1);
        assert_eq!(used_idx(&m, &q), 3);
        let mut hdr = [0u8; 12];
        m.read_slice(&mut hdr, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 3);
    }

    #[test]
    fn a_frame_larger_than_the_whole_ring_is_dropped() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 4);
        q.add_desc_chains(&buffers(4, 100), 0).unwrap();
        let mut rx: Queue = q.create_queue().unwrap();
        let mut net = detached(MRG);
        assert_eq!(
            offer(&mut net, &mut rx, &m, &frame(1000)),
            Delivery::Dropped { used: false }
        );
        assert_eq!(rx.next_avail(), 0, "the buffers serve the next frame");
    }

    #[test]
    fn without_mergeable_buffers_a_frame_takes_one_chain() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        q.add_desc_chains(&buffers(2, 1500), 0).unwrap();
        let mut rx: Queue = q.create_queue().unwrap();
        let mut net = detached(PLAIN);
        assert_eq!(
            offer(&mut net, &mut rx, &m, &frame(1400)),
            Delivery::Delivered
        );
        assert_eq!(used_elem(&m, &q, 0), (0, 1400));
        let mut hdr = [0u8; 12];
        m.read_slice(&mut hdr, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1);
        // Too big for one chain: dropped, the chain kept.
        assert_eq!(
            offer(&mut net, &mut rx, &m, &frame(2000)),
            Delivery::Dropped { used: false }
        );
        assert_eq!(rx.next_avail(), 1);
    }

    #[test]
    fn hostile_rx_buffers_drop_the_frame() {
        let m = mem();
        let mut net = detached(MRG);
        // A device-readable buffer: taken and returned empty.
        let q = MockSplitQueue::new(&m, 16);
        q.add_desc_chains(
            &[desc(0x10_0000, 1000, F_WRITE), desc(0x20_0000, 1000, 0)],
            0,
        )
        .unwrap();
        let mut rx: Queue = q.create_queue().unwrap();
        assert_eq!(
            offer(&mut net, &mut rx, &m, &frame(1500)),
            Delivery::Dropped { used: true }
        );
        assert_eq!(used_idx(&m, &q), 2);
        assert_eq!(used_elem(&m, &q, 0), (0, 0));
        assert_eq!(used_elem(&m, &q, 1), (1, 0));
        // Outside guest memory: the same.
        let q = MockSplitQueue::new(&m, 16);
        q.add_desc_chains(&[desc(u64::MAX - 10, 2000, F_WRITE)], 0)
            .unwrap();
        let mut rx: Queue = q.create_queue().unwrap();
        assert_eq!(
            offer(&mut net, &mut rx, &m, &frame(1500)),
            Delivery::Dropped { used: true }
        );
        assert_eq!(used_elem(&m, &q, 0), (0, 0));
    }

    /// A TX queue holding `frames` (each one chain of one descriptor).
    fn send(net: &mut Net, m: &GuestMemoryMmap, frames: &[Vec<u8>]) {
        let q = MockSplitQueue::new(m, 16);
        let descs: Vec<RawDescriptor> = frames
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let at = 0x10_0000 + i as u64 * 0x1_0000;
                m.write_slice(f, GuestAddress(at)).unwrap();
                desc(at, f.len() as u32, 0)
            })
            .collect();
        q.add_desc_chains(&descs, 0).unwrap();
        let mut queues = [q.create_queue().unwrap(), q.create_queue().unwrap()];
        queues.swap(0, 1);
        net.process_queue(TX_QUEUE, &mut queues, m);
    }

    #[test]
    fn bad_tx_headers_are_counted_and_dropped_before_the_tap() {
        let m = mem();
        let mut net = detached(PLAIN);
        let good = frame(60);
        let mut csum = frame(60);
        csum[0] = F_NEEDS_CSUM;
        let mut gso = frame(9000);
        gso[1] = GSO_TCPV4;
        gso[4..6].copy_from_slice(&1448u16.to_le_bytes());
        send(&mut net, &m, &[good.clone(), csum.clone(), gso.clone()]);
        assert_eq!(net.metrics.bad_tx, 2, "offloads the driver did not accept");
        assert_eq!(
            net.metrics.tx_dropped, 1,
            "detached: the good frame is dropped"
        );
        let mut net = detached(MRG);
        send(&mut net, &m, &[good, csum, gso, vec![0; 12]]);
        assert_eq!(net.metrics.bad_tx, 1, "only the bare header");
        assert_eq!(net.metrics.tx_dropped, 3);
    }

    /// Sets or clears the driver's VIRTQ_AVAIL_F_NO_INTERRUPT on a mock queue.
    fn set_polling(m: &GuestMemoryMmap, q: &MockSplitQueue<'_, GuestMemoryMmap>, on: bool) {
        m.write_obj(u16::from(on).to_le(), q.avail_addr()).unwrap();
    }

    /// Gives `frame` to the device as if read from the TAP.
    fn arrive(net: &mut Net, queues: &mut [Queue], m: &GuestMemoryMmap, frame: &[u8]) -> bool {
        net.rx_buf[..frame.len()].copy_from_slice(frame);
        net.rx_pending = Some(frame.len());
        net.receive(queues, m)
    }

    #[test]
    fn segments_are_merged_while_the_guest_polls_and_delivered_when_it_stops() {
        use crate::devices::virtio::net::coalesce::tests::{ACK, PSH, segment};
        use crate::devices::virtio::net::header::VnetHeader;
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        q.add_desc_chains(&buffers(8, 4096), 0).unwrap();
        let mut queues = [q.create_queue().unwrap(), q.create_queue().unwrap()];
        let mut net = detached(MRG);
        set_polling(&m, &q, true);
        for i in 0..3u32 {
            let f = segment(100 + i * 1448, 1448, ACK | PSH, 7);
            assert!(!arrive(&mut net, &mut queues, &m, &f), "held, no interrupt");
        }
        assert_eq!(used_idx(&m, &q), 0, "held while the guest polls");
        assert_eq!(net.metrics.rx_merged, 2);
        // The driver re-enables interrupts (its poll is done): the frame goes at once.
        set_polling(&m, &q, false);
        assert!(net.receive(&mut queues, &m));
        assert_eq!(used_idx(&m, &q), 2, "one frame over two 4 KiB buffers");
        assert_eq!(net.metrics.rx_frames, 1);
        let mut hdr = [0u8; 12];
        m.read_slice(&mut hdr, GuestAddress(0x10_0000)).unwrap();
        let hdr = VnetHeader::parse(&hdr).unwrap();
        assert_eq!(
            (hdr.gso_type, hdr.gso_size, hdr.num_buffers),
            (GSO_TCPV4, 1448, 2)
        );
        // An idle guest gets a segment as it comes, unchanged.
        let f = segment(100 + 3 * 1448, 1448, ACK, 8);
        assert!(arrive(&mut net, &mut queues, &m, &f));
        let mut back = vec![0u8; f.len()];
        m.read_slice(&mut back, GuestAddress(0x10_0000 + 2 * 0x1_0000))
            .unwrap();
        assert_eq!(back[12..], f[12..]);
        assert_eq!(u16::from_le_bytes([back[10], back[11]]), 1);
        // A guest without TSO gets no merged frames.
        let mut plain = detached(PLAIN);
        set_polling(&m, &q, true);
        arrive(&mut plain, &mut queues, &m, &segment(0, 1448, ACK, 1));
        assert_eq!(plain.metrics.rx_frames, 1);
    }

    #[test]
    fn offloads_follow_the_guests_receive_features() {
        assert_eq!(tun_offloads(PLAIN), 0);
        assert_eq!(tun_offloads(FEATURES), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6);
        assert_eq!(
            tun_offloads(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4),
            TUN_F_CSUM | TUN_F_TSO4
        );
        // TSO without checksum offload is not something the TAP (or the spec) allows.
        assert_eq!(tun_offloads(VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_eq!(tun_offloads(VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4), 0);
    }

    #[test]
    fn frames_move_between_a_tap_and_the_queues() {
        use crate::devices::virtio::net::tap::tests::in_new_netns;
        let Some(()) = in_new_netns(|| {
            let m = mem();
            let tap = Tap::open("cocoontest0").unwrap();
            let mut net = Net::new(Some(tap), [2, 0, 0, 0, 0, 1]).unwrap();
            net.activate(MRG);
            // The TAP is down, so a write is refused: counted, not fatal.
            send(&mut net, &m, &[frame(60)]);
            assert_eq!(net.metrics.bad_tx, 0);
            assert_eq!(net.metrics.tx_frames + net.metrics.tx_dropped, 1);
            // Nothing to read: receive stops quietly.
            let q = MockSplitQueue::new(&m, 16);
            q.add_desc_chains(&buffers(2, 1500), 0).unwrap();
            let mut queues = [q.create_queue().unwrap(), q.create_queue().unwrap()];
            assert!(!net.process_host_events(&mut queues, &m));
            net.reset();
            assert_eq!(net.tap_name(), Some("cocoontest0"));
        }) else {
            eprintln!("SKIPPED frames_move_between_a_tap_and_the_queues: needs root");
            return;
        };
    }
}
