//! The vsock device: RX, TX and event queues, the guest's CID in config space, packets moved
//! between the queues and the muxer.

use std::os::fd::RawFd;
use std::path::Path;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::muxer::Muxer;
use super::packet::{RxBuffer, read_tx};
use super::persist::VsockState;
use crate::devices::virtio::persist::DeviceState;
use crate::devices::virtio::{
    CHAIN_BUDGET, Pass, VIRTIO_F_VERSION_1, VirtioDevice, read_config_space, serve_chains_or_hold,
};

pub const VIRTIO_ID_VSOCK: u32 = 19;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
pub const QUEUE_SIZE: u16 = 256;
/// `virtio_vsock_event.id`: the guest must drop its connections and re-read its CID.
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Size of `struct virtio_vsock_event { le32 id; }`.
pub const EVENT_SIZE: u32 = 4;

pub struct Vsock {
    cid: u64,
    muxer: Muxer,
    queue_sizes: [u16; 3],
    /// TX chains wait in their ring because the muxer owes the guest `MAX_CONTROL` packets:
    /// served again, without a kick, once RX buffers have taken some.
    tx_held: bool,
}

impl Vsock {
    /// A device for guest `cid`, its host side listening on `uds_path`.
    pub fn new(cid: u64, uds_path: &Path) -> std::io::Result<Vsock> {
        Ok(Vsock {
            cid,
            muxer: Muxer::new(cid, uds_path)?,
            queue_sizes: [QUEUE_SIZE; 3],
            tx_held: false,
        })
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    pub fn next_port(&self) -> u32 {
        self.muxer.next_port()
    }

    pub fn continue_ports_from(&mut self, port: u32) {
        self.muxer.continue_ports_from(port);
    }

    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Puts one TRANSPORT_RESET event in the first buffer of the event queue. Returns whether
    /// a buffer was used; without one (the driver has not refilled the queue) the guest is
    /// not told, and its old connections end as each gets a reset from the muxer instead.
    fn send_transport_reset(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(queue) = queues.get_mut(EVENT_QUEUE).filter(|q| q.ready()) else {
            return false;
        };
        let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
            tracing::warn!("vsock: no event buffer to announce the transport reset");
            return false;
        };
        let head = chain.head_index();
        // Linux posts one write-only 4-byte buffer per event; a buffer we cannot write is
        // returned empty, which the driver ignores.
        let len = match chain.next() {
            Some(desc) if desc.is_write_only() && desc.len() >= EVENT_SIZE => mem
                .write_obj(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le(), desc.addr())
                .map_or(0, |()| EVENT_SIZE),
            _ => 0,
        };
        if len == 0 {
            tracing::debug!("vsock: unusable event buffer");
        }
        queue.add_used(mem, head, len).is_ok()
    }

    /// Moves packets from the muxer into the guest's RX buffers while both have some, at most
    /// `CHAIN_BUDGET` of them (host sockets are edge-triggered: what is left is `more`).
    fn fill_rx(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Pass {
        let Some(rx) = queues.get_mut(RX_QUEUE) else {
            return Pass::default();
        };
        let mut pass = Pass::default();
        let mut filled = 0usize;
        while self.muxer.has_rx_work() {
            if filled == CHAIN_BUDGET {
                pass.more = true;
                break;
            }
            filled += 1;
            let Some(chain) = rx.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match RxBuffer::new(chain, mem) {
                Ok(buffer) => match self.muxer.next_rx(buffer.payload_room()) {
                    Some((header, payload)) => buffer.write(mem, header, &payload),
                    None => {
                        // Nothing to send after all: give the buffer back untouched.
                        rx.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    tracing::debug!("vsock: unusable RX buffer: {e}");
                    self.muxer.metrics.bad_packets += 1;
                    0
                }
            };
            if rx.add_used(mem, head, len).is_err() {
                break;
            }
            pass.used = true;
        }
        pass
    }

    /// Hands the guest's TX packets to the muxer, unless it already owes the guest
    /// `MAX_CONTROL` answers: then the chains stay in the ring (the guest's sends wait) until
    /// RX buffers take some, so a guest that asks without reading cannot grow our memory.
    fn serve_tx(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Pass {
        let Some(tx) = queues.get_mut(TX_QUEUE) else {
            return Pass::default();
        };
        let muxer = &mut self.muxer;
        let mut held = false;
        let pass = serve_chains_or_hold(tx, mem, |chain| {
            if muxer.control_full() {
                held = true;
                return None;
            }
            match read_tx(chain, mem) {
                Ok((header, payload)) => muxer.handle_guest_packet(header, &payload),
                Err(e) => {
                    tracing::debug!("vsock: bad TX packet: {e}");
                    muxer.metrics.bad_packets += 1;
                }
            }
            Some(0)
        });
        self.tx_held = held;
        pass
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn vm_ended(&mut self) {
        self.muxer.close_host_side();
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    /// `struct virtio_vsock_config { le64 guest_cid; }`
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.cid.to_le_bytes(), offset, data);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Pass {
        let mut pass = Pass::default();
        if index == TX_QUEUE || self.tx_held {
            // Answers owed go out first, making room for those the TX packets will need.
            pass |= self.fill_rx(queues, mem);
            pass |= self.serve_tx(queues, mem);
        }
        // Answers to TX packets, or new RX buffers for waiting data.
        pass |= self.fill_rx(queues, mem);
        pass
    }

    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_host_events(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Pass {
        self.muxer.handle_host_events();
        let mut pass = self.fill_rx(queues, mem);
        if self.tx_held {
            pass |= self.serve_tx(queues, mem);
            pass |= self.fill_rx(queues, mem);
        }
        pass
    }

    /// Host clients may come before the guest's driver (the runtime connects while the guest
    /// boots): they are accepted and their REQUESTs wait for the first RX buffers.
    fn note_host_events(&mut self) {
        self.muxer.handle_host_events();
    }

    fn reset(&mut self) {
        self.tx_held = false;
    }

    fn save(&self) -> DeviceState {
        DeviceState::Vsock(VsockState::save(self))
    }

    /// The restored muxer has no connections, so the guest's are dead: the TRANSPORT_RESET
    /// event makes the guest reset them all (and re-read its CID) while its listening sockets
    /// stay, so the host can connect again at once.
    fn after_restore(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        self.send_transport_reset(queues, mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::request::tests::{F_WRITE, desc, mem};
    use crate::devices::virtio::vsock::muxer::MAX_CONTROL;
    use crate::devices::virtio::vsock::packet::OP_RW;
    use crate::devices::virtio::vsock::packet::tests::header;
    use std::sync::Arc;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    /// A guest that floods packets the host must answer (data for connections that do not
    /// exist: each earns an RST) and gives no RX buffers: the answers stop at `MAX_CONTROL`
    /// and the rest of its TX chains wait in the ring, until RX buffers take the answers.
    #[test]
    fn a_guest_that_takes_no_answers_cannot_grow_them() {
        let dir = std::env::temp_dir().join(format!("cocoon-vsockdev-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let m = mem();
        let mocks: Vec<MockSplitQueue<'_, GuestMemoryMmap>> = (0..3u64)
            .map(|i| MockSplitQueue::create(&m, GuestAddress(0x8000 + i * 0x2000), QUEUE_SIZE))
            .collect();
        let mut packet = header(OP_RW, 1).to_bytes().to_vec();
        packet.push(b'x');
        m.write_slice(&packet, GuestAddress(0x40_0000)).unwrap();
        let flood: Vec<_> = (0..QUEUE_SIZE)
            .map(|_| desc(0x40_0000, packet.len() as u32, 0))
            .collect();
        mocks[TX_QUEUE].add_desc_chains(&flood, 0).unwrap();
        let mut queues: Vec<Queue> = mocks.iter().map(|q| q.create_queue().unwrap()).collect();
        let mut vsock = Vsock::new(3, &dir.join("v.sock")).unwrap();

        // As the device thread would: again while the device says there is more.
        while vsock.process_queue(TX_QUEUE, &mut queues, &m).more {}
        let owed = vsock.muxer.owed_packets();
        assert!(owed <= MAX_CONTROL + 1, "{owed} answers queued");
        let taken = queues[TX_QUEUE].next_avail();
        assert!(
            usize::from(taken) <= MAX_CONTROL + 1,
            "{taken} TX chains taken"
        );
        assert!(taken < QUEUE_SIZE, "the rest wait in the ring");

        // The guest gives RX buffers: answers go out and TX is served again, with no TX kick.
        let buffers: Vec<_> = (0..64u64)
            .map(|i| desc(0x50_0000 + i * 0x100, 0x100, F_WRITE))
            .collect();
        mocks[RX_QUEUE].add_desc_chains(&buffers, 0).unwrap();
        let pass = vsock.process_queue(RX_QUEUE, &mut queues, &m);
        assert!(pass.used);
        assert!(queues[TX_QUEUE].next_avail() > taken, "TX goes on");
        assert!(vsock.muxer.owed_packets() <= MAX_CONTROL + 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A host client that comes before the guest's driver (the runtime connects while the
    /// guest boots) is taken by the device thread even so: left in the backlog, it would keep
    /// the muxer's fd readable and the thread, which polls level-triggered, spinning.
    #[test]
    fn clients_before_the_driver_do_not_spin_the_device_thread() {
        use crate::devices::virtio::Interrupt;
        use crate::devices::virtio::mmio::MmioTransport;
        use std::io::Write;
        use vmm_sys_util::eventfd::EventFd;
        let dir = std::env::temp_dir().join(format!("cocoon-vsockearly-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let vsock = Vsock::new(3, &path).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut t = MmioTransport::new(Box::new(vsock), mem(), irq);
        let fd = t.host_event_fd().unwrap();
        let readable = || {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one pollfd we own, without waiting.
            unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
        };
        let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 52\n").unwrap();
        assert!(readable());
        for _ in 0..3 {
            t.host_event();
        }
        assert!(!t.is_activated());
        assert!(!readable(), "nothing left for the device thread to spin on");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
