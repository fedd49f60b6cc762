//! The network device: RX and TX queues moving frames (with their virtio-net header) between the
//! guest and a TAP. The TAP is read edge-triggered, and only while the guest has RX buffers; a
//! frame read with no buffer to put it in waits for the next one.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::persist::NetState;
use super::tap::{Tap, VNET_HDR_SIZE};
use crate::devices::virtio::persist::DeviceState;
use crate::devices::virtio::{VIRTIO_F_VERSION_1, VirtioDevice, read_config_space, serve_chains};

pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const QUEUE_SIZE: u16 = 256;
/// The features a network device offers.
pub const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC;
/// Largest frame with its header we move (64 KiB frame, as a TAP can hand us).
pub const MAX_FRAME: usize = VNET_HDR_SIZE + 65535;

/// Per-device counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetMetrics {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub bad_tx: u64,
    pub rx_dropped: u64,
}

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    epoll: Epoll,
    /// A frame read from the TAP that found no RX buffer yet.
    pending: Option<Vec<u8>>,
    /// Edge-triggered: the TAP may hold frames we have not read.
    tap_readable: bool,
    queue_sizes: [u16; 2],
    pub metrics: NetMetrics,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> std::io::Result<Net> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            tap.file.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, 0),
        )?;
        Ok(Net {
            tap,
            mac,
            epoll,
            pending: None,
            tap_readable: true,
            queue_sizes: [QUEUE_SIZE; 2],
            metrics: NetMetrics::default(),
        })
    }

    pub fn tap_name(&self) -> &str {
        &self.tap.name
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Writes one guest frame (header included) to the TAP; bad chains are dropped.
    fn transmit(&mut self, mem: &GuestMemoryMmap, chain: impl Iterator<Item = Descriptor>) {
        let mut frame = Vec::new();
        for desc in chain {
            let len = desc.len() as usize;
            if desc.is_write_only() || frame.len() + len > MAX_FRAME {
                self.metrics.bad_tx += 1;
                return;
            }
            let start = frame.len();
            frame.resize(start + len, 0);
            if mem.read_slice(&mut frame[start..], desc.addr()).is_err() {
                self.metrics.bad_tx += 1;
                return;
            }
        }
        if frame.len() <= VNET_HDR_SIZE {
            self.metrics.bad_tx += 1;
            return;
        }
        // A full TAP queue drops the frame, as a NIC would; TCP resends.
        // A TAP write is one whole frame or nothing.
        match self.tap.file.write(&frame) {
            Ok(n) if n == frame.len() => self.metrics.tx_frames += 1,
            Ok(n) => tracing::debug!(
                "virtio-net: TAP {} took {n} of {} bytes",
                self.tap.name,
                frame.len()
            ),
            Err(e) => tracing::debug!("virtio-net: TAP {} write: {e}", self.tap.name),
        }
    }

    /// Moves frames from the TAP into the guest's RX buffers while both have some.
    fn receive(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(rx) = queues.get_mut(RX_QUEUE) else {
            return false;
        };
        let mut used_any = false;
        loop {
            let frame = match self.pending.take() {
                Some(f) => f,
                None if self.tap_readable => {
                    let mut buf = vec![0u8; MAX_FRAME];
                    match self.tap.file.read(&mut buf) {
                        Ok(n) => {
                            buf.truncate(n);
                            buf
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => {
                            self.tap_readable = false;
                            break;
                        }
                    }
                }
                None => break,
            };
            let Some(chain) = rx.pop_descriptor_chain(mem) else {
                self.pending = Some(frame);
                break;
            };
            let head = chain.head_index();
            let len = write_frame(mem, chain, &frame);
            if len == 0 {
                self.metrics.rx_dropped += 1;
            } else {
                self.metrics.rx_frames += 1;
            }
            if rx.add_used(mem, head, len).is_err() {
                break;
            }
            used_any = true;
        }
        used_any
    }
}

/// Copies `frame` into the chain's writable buffers; 0 (frame dropped) when they are not all
/// writable, lie outside guest memory or are too small for the whole frame.
fn write_frame(
    mem: &GuestMemoryMmap,
    chain: impl Iterator<Item = Descriptor>,
    frame: &[u8],
) -> u32 {
    let descs: Vec<Descriptor> = chain.collect();
    let room: usize = descs.iter().map(|d| d.len() as usize).sum();
    if room < frame.len() || descs.iter().any(|d| !d.is_write_only()) {
        return 0;
    }
    let mut written = 0usize;
    for desc in descs {
        if written == frame.len() {
            break;
        }
        let n = (desc.len() as usize).min(frame.len() - written);
        if mem
            .write_slice(&frame[written..written + n], desc.addr())
            .is_err()
        {
            return 0;
        }
        written += n;
    }
    written as u32
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
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

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        if index == TX_QUEUE
            && let Some(tx) = queues.get_mut(TX_QUEUE)
        {
            used |= serve_chains(tx, mem, |chain| {
                self.transmit(mem, chain);
                0
            });
        }
        used | self.receive(queues, mem)
    }

    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_host_events(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let mut events = [EpollEvent::default(); 4];
        if self.epoll.wait(0, &mut events).is_ok_and(|n| n > 0) {
            self.tap_readable = true;
        }
        self.receive(queues, mem)
    }

    fn save(&self) -> DeviceState {
        DeviceState::Net(NetState::save(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::request::tests::{F_WRITE, desc, mem};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    fn write(descs: &[virtio_queue::desc::RawDescriptor], frame: &[u8]) -> (GuestMemoryMmap, u32) {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        let len = write_frame(&m, chain, frame);
        (m, len)
    }

    #[test]
    fn frames_fill_writable_buffers_across_descriptors() {
        let frame: Vec<u8> = (0..100u8).collect();
        let (m, len) = write(
            &[desc(0x10_0000, 60, F_WRITE), desc(0x20_0000, 1500, F_WRITE)],
            &frame,
        );
        assert_eq!(len, 100);
        let mut back = vec![0u8; 40];
        m.read_slice(&mut back, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(back, frame[60..]);
    }

    #[test]
    fn hostile_rx_buffers_drop_the_frame() {
        let frame = vec![1u8; 100];
        assert_eq!(
            write(&[desc(0x10_0000, 50, F_WRITE)], &frame).1,
            0,
            "too small"
        );
        assert_eq!(
            write(&[desc(0x10_0000, 200, 0)], &frame).1,
            0,
            "device-readable"
        );
        assert_eq!(
            write(&[desc(u64::MAX - 10, 200, F_WRITE)], &frame).1,
            0,
            "outside memory"
        );
    }
}
