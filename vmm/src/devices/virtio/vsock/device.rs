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
use crate::devices::virtio::{VIRTIO_F_VERSION_1, VirtioDevice, read_config_space, serve_chains};

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
}

impl Vsock {
    /// A device for guest `cid`, its host side listening on `uds_path`.
    pub fn new(cid: u64, uds_path: &Path) -> std::io::Result<Vsock> {
        Ok(Vsock {
            cid,
            muxer: Muxer::new(cid, uds_path)?,
            queue_sizes: [QUEUE_SIZE; 3],
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

    /// Moves packets from the muxer into the guest's RX buffers while both have some.
    fn fill_rx(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(rx) = queues.get_mut(RX_QUEUE) else {
            return false;
        };
        let mut used_any = false;
        while self.muxer.has_rx_work() {
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
            used_any = true;
        }
        used_any
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

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        if index == TX_QUEUE {
            let Some(tx) = queues.get_mut(TX_QUEUE) else {
                return false;
            };
            let muxer = &mut self.muxer;
            used |= serve_chains(tx, mem, |chain| {
                match read_tx(chain, mem) {
                    Ok((header, payload)) => muxer.handle_guest_packet(header, &payload),
                    Err(e) => {
                        tracing::debug!("vsock: bad TX packet: {e}");
                        muxer.metrics.bad_packets += 1;
                    }
                }
                0
            });
        }
        // Answers to TX packets, or new RX buffers for waiting data.
        used | self.fill_rx(queues, mem)
    }

    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_host_events(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        self.muxer.handle_host_events();
        self.fill_rx(queues, mem)
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
