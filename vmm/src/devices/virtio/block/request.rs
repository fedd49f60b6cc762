//! Parsing a virtio-blk request out of a guest descriptor chain.
//!
//! The chain is hostile input. We accept the framing every Linux driver uses (one readable
//! 16-byte header, data descriptors, one writable status byte last) and check everything else:
//! directions, lengths, that each buffer lies in guest memory, that the sectors lie on the
//! disk, and that the chain ended rather than being cut short by a loop or a bad `next`.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the id string GET_ID returns.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_SIZE: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

impl From<u32> for RequestKind {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestKind::In,
            VIRTIO_BLK_T_OUT => RequestKind::Out,
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            other => RequestKind::Unsupported(other),
        }
    }
}

/// One guest buffer of a request's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub sector: u64,
    pub data: Vec<Segment>,
    pub data_len: u64,
    pub status: GuestAddress,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor chain is empty or has no status descriptor")]
    ChainTooShort,
    #[error("descriptor chain does not end (loop, bad next index or too long)")]
    ChainTruncated,
    #[error("request header descriptor is device-writable")]
    HeaderWritable,
    #[error("request header descriptor is {0} bytes, shorter than {HEADER_SIZE}")]
    HeaderTooShort(u32),
    #[error("status descriptor is read-only or empty")]
    BadStatusDescriptor,
    #[error("{what} descriptor at {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        what: &'static str,
        addr: u64,
        len: u32,
    },
    #[error("data descriptor {0} has the wrong direction for the request type")]
    WrongDirection(usize),
    #[error("data descriptor {0} is empty")]
    EmptySegment(usize),
    #[error("data length {0} is zero or not a multiple of {SECTOR_SIZE}")]
    BadDataLength(u64),
    #[error("sectors {sector}+{count} are beyond the disk's {capacity}")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("disk is read-only")]
    ReadOnly,
}

/// Why a request failed, and where its status byte is when the chain had a usable one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub error: RequestError,
    pub status: Option<GuestAddress>,
}

fn in_memory(
    mem: &GuestMemoryMmap,
    what: &'static str,
    desc: &Descriptor,
) -> Result<(), RequestError> {
    if mem.check_range(desc.addr(), desc.len() as usize) {
        Ok(())
    } else {
        Err(RequestError::OutsideMemory {
            what,
            addr: desc.addr().0,
            len: desc.len(),
        })
    }
}

impl Request {
    /// Parses the descriptors of one chain for a disk of `capacity` sectors.
    pub fn parse(
        chain: impl Iterator<Item = Descriptor>,
        mem: &GuestMemoryMmap,
        capacity: u64,
        read_only: bool,
    ) -> Result<Request, Rejected> {
        // The chain iterator is bounded by the queue size, so this cannot grow without bound.
        let descs: Vec<Descriptor> = chain.collect();
        let status_desc = match descs.last() {
            Some(d) if descs.len() >= 2 => *d,
            _ => {
                return Err(Rejected {
                    error: RequestError::ChainTooShort,
                    status: None,
                });
            }
        };
        let reject = |error| {
            Err(Rejected {
                error,
                status: None,
            })
        };
        if status_desc.has_next() {
            return reject(RequestError::ChainTruncated);
        }
        if !status_desc.is_write_only() || status_desc.len() == 0 {
            return reject(RequestError::BadStatusDescriptor);
        }
        // The status byte is the last byte of the last descriptor.
        let status_addr = status_desc
            .addr()
            .checked_add(u64::from(status_desc.len()) - 1)
            .filter(|a| mem.check_range(*a, 1));
        let Some(status) = status_addr else {
            return reject(RequestError::OutsideMemory {
                what: "status",
                addr: status_desc.addr().0,
                len: status_desc.len(),
            });
        };
        Self::parse_with_status(&descs, mem, capacity, read_only, status).map_err(|error| {
            Rejected {
                error,
                status: Some(status),
            }
        })
    }

    fn parse_with_status(
        descs: &[Descriptor],
        mem: &GuestMemoryMmap,
        capacity: u64,
        read_only: bool,
        status: GuestAddress,
    ) -> Result<Request, RequestError> {
        let header = &descs[0];
        if header.is_write_only() {
            return Err(RequestError::HeaderWritable);
        }
        if header.len() < HEADER_SIZE {
            return Err(RequestError::HeaderTooShort(header.len()));
        }
        in_memory(mem, "header", header)?;
        let read = |offset: u64| -> Result<u64, RequestError> {
            let addr = header
                .addr()
                .checked_add(offset)
                .ok_or(RequestError::OutsideMemory {
                    what: "header",
                    addr: header.addr().0,
                    len: header.len(),
                })?;
            mem.read_obj::<u64>(addr)
                .map_err(|_| RequestError::OutsideMemory {
                    what: "header",
                    addr: header.addr().0,
                    len: header.len(),
                })
        };
        let kind = RequestKind::from(u64::from_le(read(0)?) as u32);
        let sector = u64::from_le(read(8)?);

        let data_descs = &descs[1..descs.len() - 1];
        let mut data = Vec::with_capacity(data_descs.len());
        let mut data_len: u64 = 0;
        for (i, desc) in data_descs.iter().enumerate() {
            let want_writable = match kind {
                RequestKind::In | RequestKind::GetId => Some(true),
                RequestKind::Out => Some(false),
                RequestKind::Flush | RequestKind::Unsupported(_) => None,
            };
            if let Some(w) = want_writable
                && desc.is_write_only() != w
            {
                return Err(RequestError::WrongDirection(i));
            }
            if desc.len() == 0 {
                return Err(RequestError::EmptySegment(i));
            }
            in_memory(mem, "data", desc)?;
            data_len += u64::from(desc.len());
            data.push(Segment {
                addr: desc.addr(),
                len: desc.len(),
            });
        }

        match kind {
            RequestKind::In | RequestKind::Out => {
                if data_len == 0 || !data_len.is_multiple_of(SECTOR_SIZE) {
                    return Err(RequestError::BadDataLength(data_len));
                }
                let count = data_len >> SECTOR_SHIFT;
                if sector.checked_add(count).is_none_or(|end| end > capacity) {
                    return Err(RequestError::OutOfRange {
                        sector,
                        count,
                        capacity,
                    });
                }
                if kind == RequestKind::Out && read_only {
                    return Err(RequestError::ReadOnly);
                }
            }
            RequestKind::GetId if data_len == 0 => return Err(RequestError::BadDataLength(0)),
            _ => {}
        }
        Ok(Request {
            kind,
            sector,
            data,
            data_len,
            status,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    pub const F_NEXT: u16 = 1;
    pub const F_WRITE: u16 = 2;
    pub const MEM_SIZE: usize = 0x100_0000;

    pub fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    pub fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    pub fn write_header(mem: &GuestMemoryMmap, addr: u64, kind: u32, sector: u64) {
        mem.write_obj(u64::from(kind).to_le(), GuestAddress(addr))
            .unwrap();
        mem.write_obj(sector.to_le(), GuestAddress(addr + 8))
            .unwrap();
    }

    /// Parses a chain built from `descs` (NEXT flags set for all but the last).
    fn parse(
        mem: &GuestMemoryMmap,
        descs: &[RawDescriptor],
        ro: bool,
    ) -> Result<Request, Rejected> {
        let q = MockSplitQueue::new(mem, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        Request::parse(chain, mem, 64, ro)
    }

    #[test]
    fn read_request_parses() {
        let m = mem();
        write_header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 2);
        let r = parse(
            &m,
            &[
                desc(0x10_0000, 16, 0),
                desc(0x20_0000, 1024, F_WRITE),
                desc(0x30_0000, 1, F_WRITE),
            ],
            false,
        )
        .unwrap();
        assert_eq!((r.kind, r.sector, r.data_len), (RequestKind::In, 2, 1024));
        assert_eq!(r.status, GuestAddress(0x30_0000));
    }

    #[test]
    fn flush_without_data_parses() {
        let m = mem();
        write_header(&m, 0x10_0000, VIRTIO_BLK_T_FLUSH, 0);
        let r = parse(
            &m,
            &[desc(0x10_0000, 16, 0), desc(0x30_0000, 1, F_WRITE)],
            true,
        )
        .unwrap();
        assert_eq!(r.kind, RequestKind::Flush);
    }

    fn rejected(m: &GuestMemoryMmap, descs: &[RawDescriptor], ro: bool) -> Rejected {
        parse(m, descs, ro).expect_err("request must be rejected")
    }

    #[test]
    fn malformed_chains_are_rejected_with_a_reason() {
        let m = mem();
        write_header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
        let hdr = desc(0x10_0000, 16, 0);
        let status = desc(0x30_0000, 1, F_WRITE);
        let data = |flags| desc(0x20_0000, 512, flags);

        // Only a header.
        assert_eq!(
            rejected(&m, &[hdr], false).error,
            RequestError::ChainTooShort
        );
        // Status descriptor not writable: no status can be written.
        let r = rejected(&m, &[hdr, data(F_WRITE), desc(0x30_0000, 1, 0)], false);
        assert_eq!(
            (r.error, r.status),
            (RequestError::BadStatusDescriptor, None)
        );
        // Header writable / too short.
        let r = rejected(
            &m,
            &[desc(0x10_0000, 16, F_WRITE), data(F_WRITE), status],
            false,
        );
        assert_eq!(r.error, RequestError::HeaderWritable);
        assert_eq!(r.status, Some(GuestAddress(0x30_0000)));
        let r = rejected(&m, &[desc(0x10_0000, 8, 0), data(F_WRITE), status], false);
        assert_eq!(r.error, RequestError::HeaderTooShort(8));
        // Read into a device-readable buffer.
        assert_eq!(
            rejected(&m, &[hdr, data(0), status], false).error,
            RequestError::WrongDirection(0)
        );
        // Zero and odd lengths.
        let r = rejected(&m, &[hdr, desc(0x20_0000, 0, F_WRITE), status], false);
        assert_eq!(r.error, RequestError::EmptySegment(0));
        let r = rejected(&m, &[hdr, desc(0x20_0000, 100, F_WRITE), status], false);
        assert_eq!(r.error, RequestError::BadDataLength(100));
        // Huge length and addresses outside guest memory.
        let r = rejected(&m, &[hdr, desc(0x20_0000, !511, F_WRITE), status], false);
        assert!(matches!(
            r.error,
            RequestError::OutsideMemory { what: "data", .. }
        ));
        let r = rejected(
            &m,
            &[hdr, desc(MEM_SIZE as u64 - 256, 512, F_WRITE), status],
            false,
        );
        assert!(matches!(r.error, RequestError::OutsideMemory { .. }));
        let r = rejected(
            &m,
            &[desc(u64::MAX - 4, 16, 0), data(F_WRITE), status],
            false,
        );
        assert!(matches!(
            r.error,
            RequestError::OutsideMemory { what: "header", .. }
        ));
        let r = rejected(&m, &[hdr, data(F_WRITE), desc(u64::MAX, 1, F_WRITE)], false);
        assert_eq!(r.status, None);
    }

    #[test]
    fn sectors_beyond_the_disk_and_writes_to_read_only_disks_fail() {
        let m = mem();
        let status = desc(0x30_0000, 1, F_WRITE);
        write_header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 63);
        let r = rejected(
            &m,
            &[
                desc(0x10_0000, 16, 0),
                desc(0x20_0000, 1024, F_WRITE),
                status,
            ],
            false,
        );
        assert_eq!(
            r.error,
            RequestError::OutOfRange {
                sector: 63,
                count: 2,
                capacity: 64
            }
        );
        write_header(&m, 0x10_0000, VIRTIO_BLK_T_IN, u64::MAX);
        let r = rejected(
            &m,
            &[
                desc(0x10_0000, 16, 0),
                desc(0x20_0000, 512, F_WRITE),
                status,
            ],
            false,
        );
        assert!(matches!(r.error, RequestError::OutOfRange { .. }));
        write_header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 0);
        let r = rejected(
            &m,
            &[desc(0x10_0000, 16, 0), desc(0x20_0000, 512, 0), status],
            true,
        );
        assert_eq!(r.error, RequestError::ReadOnly);
    }

    #[test]
    fn looping_chain_is_truncated_not_followed_forever() {
        let m = mem();
        write_header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
        let q = MockSplitQueue::new(&m, 16);
        // 0 -> 1 -> 0 -> 1 ...
        let descs = [
            RawDescriptor::from(Descriptor::new(0x10_0000, 16, F_NEXT, 1)),
            RawDescriptor::from(Descriptor::new(0x20_0000, 512, F_NEXT | F_WRITE, 0)),
        ];
        let chain = q.build_multiple_desc_chains(&descs).unwrap();
        let r = Request::parse(chain, &m, 64, false).unwrap_err();
        assert_eq!(r.error, RequestError::ChainTruncated);
    }

    #[test]
    fn next_index_outside_the_table_is_truncated() {
        let m = mem();
        write_header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
        let q = MockSplitQueue::new(&m, 16);
        let descs = [
            RawDescriptor::from(Descriptor::new(0x10_0000, 16, F_NEXT, 1)),
            RawDescriptor::from(Descriptor::new(0x30_0000, 1, F_NEXT | F_WRITE, 200)),
        ];
        let chain = q.build_multiple_desc_chains(&descs).unwrap();
        assert_eq!(
            Request::parse(chain, &m, 64, false).unwrap_err().error,
            RequestError::ChainTruncated
        );
    }
}
