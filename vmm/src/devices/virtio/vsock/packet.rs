//! virtio-vsock packets: the 44-byte header, reading a packet out of a guest TX chain and
//! writing one into a guest RX chain.
//!
//! A TX chain is hostile input: it must be device-readable throughout, hold a whole header, and
//! carry exactly the payload length its header announces, at most [`MAX_PAYLOAD`] bytes.
//! Anything else is rejected with a reason and never reaches a connection.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemoryMmap};

pub const HEADER_SIZE: usize = 44;
/// Largest payload we accept from or send to the guest (Linux sends at most 64 KiB).
pub const MAX_PAYLOAD: usize = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;
/// The host's context id, as every guest sees it.
pub const HOST_CID: u64 = 2;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// `struct virtio_vsock_hdr`, little endian on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Header {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"));
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("TX descriptor {0} is device-writable")]
    WritableDescriptor(usize),
    #[error("descriptor chain does not end (loop, bad next index or too long)")]
    ChainTruncated,
    #[error("descriptor at {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("chain holds {0} bytes, less than a {HEADER_SIZE}-byte header")]
    ShortHeader(usize),
    #[error("header announces {announced} payload bytes, the chain carries {carried}")]
    LengthMismatch { announced: u32, carried: usize },
    #[error("payload of {0} bytes exceeds {MAX_PAYLOAD}")]
    PayloadTooLarge(u32),
    #[error("RX chain has {0} writable bytes, less than a header")]
    RxBufferTooSmall(usize),
    #[error("RX descriptor {0} is device-readable")]
    ReadOnlyDescriptor(usize),
}

/// Reads the header and payload of a guest TX chain.
pub fn read_tx(
    chain: impl Iterator<Item = Descriptor>,
    mem: &GuestMemoryMmap,
) -> Result<(Header, Vec<u8>), PacketError> {
    let mut bytes: Vec<u8> = Vec::new();
    let mut last_has_next = false;
    for (i, desc) in chain.enumerate() {
        if desc.is_write_only() {
            return Err(PacketError::WritableDescriptor(i));
        }
        last_has_next = desc.has_next();
        let len = desc.len() as usize;
        // Bound what we copy before touching guest memory: never more than one packet.
        if bytes.len() + len > HEADER_SIZE + MAX_PAYLOAD {
            let announced = if bytes.len() >= HEADER_SIZE {
                Header::from_bytes(bytes[..HEADER_SIZE].try_into().expect("sized")).len
            } else {
                u32::MAX
            };
            return Err(PacketError::PayloadTooLarge(announced));
        }
        let start = bytes.len();
        bytes.resize(start + len, 0);
        mem.read_slice(&mut bytes[start..], desc.addr())
            .map_err(|_| PacketError::OutsideMemory {
                addr: desc.addr().0,
                len: desc.len(),
            })?;
    }
    if last_has_next {
        return Err(PacketError::ChainTruncated);
    }
    if bytes.len() < HEADER_SIZE {
        return Err(PacketError::ShortHeader(bytes.len()));
    }
    let header = Header::from_bytes(bytes[..HEADER_SIZE].try_into().expect("sized"));
    if header.len as usize > MAX_PAYLOAD {
        return Err(PacketError::PayloadTooLarge(header.len));
    }
    let carried = bytes.len() - HEADER_SIZE;
    if header.len as usize != carried {
        return Err(PacketError::LengthMismatch {
            announced: header.len,
            carried,
        });
    }
    bytes.drain(..HEADER_SIZE);
    Ok((header, bytes))
}

/// The writable buffers of a guest RX chain.
pub struct RxBuffer {
    segments: Vec<(vm_memory::GuestAddress, usize)>,
    capacity: usize,
}

impl RxBuffer {
    /// Checks an RX chain: all device-writable, inside guest memory, room for a header.
    pub fn new(
        chain: impl Iterator<Item = Descriptor>,
        mem: &GuestMemoryMmap,
    ) -> Result<RxBuffer, PacketError> {
        use vm_memory::GuestMemoryBackend;
        let mut segments = Vec::new();
        let mut capacity = 0usize;
        let mut last_has_next = false;
        for (i, desc) in chain.enumerate() {
            if !desc.is_write_only() {
                return Err(PacketError::ReadOnlyDescriptor(i));
            }
            if !mem.check_range(desc.addr(), desc.len() as usize) {
                return Err(PacketError::OutsideMemory {
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
            last_has_next = desc.has_next();
            segments.push((desc.addr(), desc.len() as usize));
            capacity += desc.len() as usize;
        }
        if last_has_next {
            return Err(PacketError::ChainTruncated);
        }
        if capacity < HEADER_SIZE {
            return Err(PacketError::RxBufferTooSmall(capacity));
        }
        Ok(RxBuffer { segments, capacity })
    }

    /// Payload bytes that fit after the header.
    pub fn payload_room(&self) -> usize {
        (self.capacity - HEADER_SIZE).min(MAX_PAYLOAD)
    }

    /// Writes `header` (its `len` set to the payload's) and `payload`; returns the used length.
    pub fn write(&self, mem: &GuestMemoryMmap, mut header: Header, payload: &[u8]) -> u32 {
        let payload = &payload[..payload.len().min(self.payload_room())];
        header.len = payload.len() as u32;
        let mut bytes = Vec::with_capacity(HEADER_SIZE + payload.len());
        bytes.extend_from_slice(&header.to_bytes());
        bytes.extend_from_slice(payload);
        let mut written = 0usize;
        for (addr, len) in &self.segments {
            if written == bytes.len() {
                break;
            }
            let n = (*len).min(bytes.len() - written);
            // The range was checked in `new`; a failure means the packet is cut short.
            if mem
                .write_slice(&bytes[written..written + n], *addr)
                .is_err()
            {
                break;
            }
            written += n;
        }
        written as u32
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::block::request::tests::{F_NEXT, F_WRITE, desc, mem};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    pub fn header(op: u16, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 5000,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    fn tx(m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<(Header, Vec<u8>), PacketError> {
        let q = MockSplitQueue::new(m, 16);
        read_tx(q.build_desc_chain(descs).unwrap(), m)
    }

    #[test]
    fn header_round_trips() {
        let h = Header {
            flags: 3,
            fwd_cnt: 77,
            ..header(OP_RW, 12)
        };
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
    }

    #[test]
    fn tx_packet_split_over_descriptors_parses() {
        let m = mem();
        m.write_slice(&header(OP_RW, 5).to_bytes(), GuestAddress(0x10_0000))
            .unwrap();
        m.write_slice(b"hello", GuestAddress(0x20_0000)).unwrap();
        let (h, data) = tx(&m, &[desc(0x10_0000, 44, 0), desc(0x20_0000, 5, 0)]).unwrap();
        assert_eq!((h.op, h.len), (OP_RW, 5));
        assert_eq!(data, b"hello");
        // Header and payload in one descriptor, header itself split in two.
        let mut all = header(OP_RW, 3).to_bytes().to_vec();
        all.extend_from_slice(b"abc");
        m.write_slice(&all[..20], GuestAddress(0x30_0000)).unwrap();
        m.write_slice(&all[20..], GuestAddress(0x40_0000)).unwrap();
        let (_, data) = tx(&m, &[desc(0x30_0000, 20, 0), desc(0x40_0000, 27, 0)]).unwrap();
        assert_eq!(data, b"abc");
    }

    #[test]
    fn hostile_tx_chains_are_rejected() {
        let m = mem();
        m.write_slice(&header(OP_RW, 100).to_bytes(), GuestAddress(0x10_0000))
            .unwrap();
        // Length disagrees with the buffer (both ways).
        assert_eq!(
            tx(&m, &[desc(0x10_0000, 44, 0), desc(0x20_0000, 10, 0)]),
            Err(PacketError::LengthMismatch {
                announced: 100,
                carried: 10
            })
        );
        assert_eq!(
            tx(&m, &[desc(0x10_0000, 44, 0), desc(0x20_0000, 200, 0)]),
            Err(PacketError::LengthMismatch {
                announced: 100,
                carried: 200
            })
        );
        // Short header, writable descriptor, outside memory, huge.
        assert_eq!(
            tx(&m, &[desc(0x10_0000, 40, 0)]),
            Err(PacketError::ShortHeader(40))
        );
        assert_eq!(
            tx(&m, &[desc(0x10_0000, 44, F_WRITE)]),
            Err(PacketError::WritableDescriptor(0))
        );
        assert!(matches!(
            tx(&m, &[desc(u64::MAX - 10, 44, 0)]),
            Err(PacketError::OutsideMemory { .. })
        ));
        // A 4 GiB descriptor: virtio-queue ends chains over 2^32 bytes, we refuse big payloads;
        // either way nothing is copied.
        assert!(matches!(
            tx(&m, &[desc(0x10_0000, 44, 0), desc(0x20_0000, u32::MAX, 0)]),
            Err(PacketError::PayloadTooLarge(_) | PacketError::ChainTruncated)
        ));
        assert!(matches!(
            tx(&m, &[desc(0x10_0000, 44, 0), desc(0x20_0000, 1 << 20, 0)]),
            Err(PacketError::PayloadTooLarge(100))
        ));
        m.write_slice(&header(OP_RW, u32::MAX).to_bytes(), GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(
            tx(&m, &[desc(0x10_0000, 44, 0)]),
            Err(PacketError::PayloadTooLarge(u32::MAX))
        );
    }

    #[test]
    fn looping_tx_chain_is_rejected() {
        let m = mem();
        m.write_slice(&header(OP_RW, 0).to_bytes(), GuestAddress(0x10_0000))
            .unwrap();
        let q = MockSplitQueue::new(&m, 16);
        let descs = [
            RawDescriptor::from(Descriptor::new(0x10_0000, 44, F_NEXT, 1)),
            RawDescriptor::from(Descriptor::new(0x20_0000, 8, F_NEXT, 0)),
        ];
        let chain = q.build_multiple_desc_chains(&descs).unwrap();
        // The loop is cut by the queue-size bound; either the size check or the end check fires.
        assert!(read_tx(chain, &m).is_err());
    }

    #[test]
    fn rx_buffer_is_checked_and_filled_across_descriptors() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[desc(0x10_0000, 30, F_WRITE), desc(0x20_0000, 100, F_WRITE)])
            .unwrap();
        let rx = RxBuffer::new(chain, &m).unwrap();
        assert_eq!(rx.payload_room(), 86);
        let used = rx.write(&m, header(OP_RW, 0), &[7u8; 200]);
        assert_eq!(used, 130);
        let mut head = [0u8; HEADER_SIZE];
        m.read_slice(&mut head[..30], GuestAddress(0x10_0000))
            .unwrap();
        m.read_slice(&mut head[30..], GuestAddress(0x20_0000))
            .unwrap();
        assert_eq!(Header::from_bytes(&head).len, 86);
        let mut tail = [0u8; 86];
        m.read_slice(&mut tail, GuestAddress(0x20_0000 + 14))
            .unwrap();
        assert_eq!(tail, [7u8; 86]);

        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let small = q.build_desc_chain(&[desc(0x10_0000, 20, F_WRITE)]).unwrap();
        assert_eq!(
            RxBuffer::new(small, &m).err(),
            Some(PacketError::RxBufferTooSmall(20))
        );
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let ro = q.build_desc_chain(&[desc(0x10_0000, 64, 0)]).unwrap();
        assert_eq!(
            RxBuffer::new(ro, &m).err(),
            Some(PacketError::ReadOnlyDescriptor(0))
        );
    }
}
