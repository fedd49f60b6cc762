//! The virtio-blk device: configuration space, features, and serving the request queue.

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::disk::Disk;
use super::persist::BlockState;
use super::request::{
    Rejected, Request, RequestKind, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};
use crate::devices::virtio::persist::DeviceState;
use crate::devices::virtio::{VIRTIO_F_VERSION_1, VirtioDevice, read_config_space, serve_chains};

pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request we announce: the queue size minus header and status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// Per-device counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockMetrics {
    pub requests: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub errors: u64,
}

/// The features a block device offers; `read_only` is whether VIRTIO_BLK_F_RO is among them.
pub fn features(read_only: bool) -> u64 {
    let ro = if read_only { VIRTIO_BLK_F_RO } else { 0 };
    VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | ro
}

pub struct Block {
    disk: Disk,
    config: [u8; 16],
    /// Whether VIRTIO_BLK_F_RO is offered. Set from the disk when the driver (re)starts, and
    /// kept across disk swaps and restores: features never change under a driver.
    read_only_offered: bool,
    queue_sizes: [u16; 1],
    pub metrics: BlockMetrics,
}

impl Block {
    pub fn new(disk: Disk) -> Self {
        let read_only = disk.read_only();
        Self::with_offer(disk, read_only)
    }

    /// A device for `disk` that offers VIRTIO_BLK_F_RO as `read_only_offered` says (a restore
    /// keeps what the driver negotiated).
    pub fn with_offer(disk: Disk, read_only_offered: bool) -> Self {
        // virtio_blk_config: capacity (le64), size_max (le32, not offered), seg_max (le32).
        let mut config = [0u8; 16];
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        let mut block = Block {
            disk,
            config,
            read_only_offered,
            queue_sizes: [QUEUE_SIZE],
            metrics: BlockMetrics::default(),
        };
        block.publish_capacity();
        block
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    pub fn read_only_offered(&self) -> bool {
        self.read_only_offered
    }

    /// Puts `disk` in place of the current one (returned) and its capacity in config space;
    /// telling the driver is the transport's part.
    pub fn replace_disk(&mut self, disk: Disk) -> Disk {
        let old = std::mem::replace(&mut self.disk, disk);
        self.publish_capacity();
        old
    }

    fn publish_capacity(&mut self) {
        self.config[0..8].copy_from_slice(&self.disk.capacity().to_le_bytes());
    }

    /// Executes one parsed request; returns its status and the bytes written into the guest's
    /// buffers (data plus the status byte).
    fn execute(&mut self, mem: &GuestMemoryMmap, req: &Request) -> (u8, u32) {
        let result = match req.kind {
            RequestKind::In => self.disk.read_into(mem, req.sector, &req.data).map(|()| {
                self.metrics.read_bytes += req.data_len;
                req.data_len as u32
            }),
            RequestKind::Out => self.disk.write_from(mem, req.sector, &req.data).map(|()| {
                self.metrics.write_bytes += req.data_len;
                0
            }),
            RequestKind::Flush => self.disk.flush().map(|()| {
                self.metrics.flushes += 1;
                0
            }),
            RequestKind::GetId => {
                let id = self.disk.id();
                let mut written = 0usize;
                for seg in &req.data {
                    let n = (seg.len as usize).min(VIRTIO_BLK_ID_BYTES - written);
                    if n == 0
                        || mem
                            .write_slice(&id[written..written + n], seg.addr)
                            .is_err()
                    {
                        break;
                    }
                    written += n;
                }
                Ok(written as u32)
            }
            RequestKind::Unsupported(_) => return (VIRTIO_BLK_S_UNSUPP, 1),
        };
        match result {
            Ok(len) => (VIRTIO_BLK_S_OK, len + 1),
            Err(e) => {
                tracing::warn!("virtio-blk {:?} at sector {}: {e}", req.kind, req.sector);
                self.metrics.errors += 1;
                (VIRTIO_BLK_S_IOERR, 1)
            }
        }
    }

    /// Serves one descriptor chain; returns the used length to report.
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    ) -> u32 {
        self.metrics.requests += 1;
        let (status_addr, status, len) =
            match Request::parse(chain, mem, self.disk.capacity(), self.disk.read_only()) {
                Ok(req) => {
                    let (status, len) = self.execute(mem, &req);
                    (Some(req.status), status, len)
                }
                Err(Rejected { error, status }) => {
                    tracing::debug!("virtio-blk request rejected: {error}");
                    self.metrics.errors += 1;
                    (status, VIRTIO_BLK_S_IOERR, 1)
                }
            };
        match status_addr {
            Some(addr) if mem.write_obj(status, addr).is_ok() => len,
            // No usable status byte: return the chain with nothing written.
            _ => 0,
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        features(self.read_only_offered)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        serve_chains(queue, mem, |chain| self.serve(mem, chain))
    }

    fn reset(&mut self) {
        // A driver starting over negotiates again, so it may learn what a swap changed.
        self.read_only_offered = self.disk.read_only();
    }

    fn save(&self) -> DeviceState {
        DeviceState::Block(BlockState::save(self))
    }

    fn as_block_mut(&mut self) -> Option<&mut Block> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::super::request::tests::{F_WRITE, desc, mem, write_header};
    use super::super::request::{VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use super::*;
    use std::io::Write;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    fn image(content: &[u8]) -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "cocoon-blk-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(content)
            .unwrap();
        path
    }

    fn run(
        block: &mut Block,
        m: &GuestMemoryMmap,
        descs: &[virtio_queue::desc::RawDescriptor],
    ) -> (u8, u32) {
        let q = MockSplitQueue::new(m, 16);
        q.add_desc_chains(
            &descs
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let d = virtio_queue::desc::split::Descriptor::from(*d);
                    let last = i == descs.len() - 1;
                    let flags = if last { d.flags() } else { d.flags() | 1 };
                    virtio_queue::desc::RawDescriptor::from(
                        virtio_queue::desc::split::Descriptor::new(
                            d.addr().0,
                            d.len(),
                            flags,
                            i as u16 + 1,
                        ),
                    )
                })
                .collect::<Vec<_>>(),
            0,
        )
        .unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        assert!(block.process_queue(0, std::slice::from_mut(&mut queue), m));
        let used_len: u32 = m.read_obj(q.used_addr().unchecked_add(8)).unwrap();
        let status: u8 = m.read_obj(GuestAddress(0x30_0000)).unwrap();
        (status, used_len)
    }

    #[test]
    fn reads_and_writes_reach_the_image() {
        let content: Vec<u8> = (0..2048u32).map(|i| (i * 7) as u8).collect();
        let path = image(&content);
        let mut block = Block::new(Disk::open(&path, false).unwrap());
        let m = mem();

        write_header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 1);
        let (status, len) = run(
            &mut block,
            &m,
            &[
                desc(0x10_0000, 16, 0),
                desc(0x20_0000, 512, F_WRITE),
                desc(0x30_0000, 1, F_WRITE),
            ],
        );
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 513));
        let mut got = vec![0u8; 512];
        m.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(got, content[512..1024]);

        m.write_slice(&[0xab; 1024], GuestAddress(0x40_0000))
            .unwrap();
        write_header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 2);
        let (status, len) = run(
            &mut block,
            &m,
            &[
                desc(0x10_0000, 16, 0),
                desc(0x40_0000, 1024, 0),
                desc(0x30_0000, 1, F_WRITE),
            ],
        );
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1));
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[1024..2048], &[0xab; 1024][..]);
        assert_eq!(&on_disk[..1024], &content[..1024]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bad_requests_get_ioerr_or_unsupp_and_the_queue_goes_on() {
        let path = image(&[0u8; 4096]);
        let mut block = Block::new(Disk::open(&path, true).unwrap());
        let m = mem();
        write_header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 0);
        let (status, _) = run(
            &mut block,
            &m,
            &[
                desc(0x10_0000, 16, 0),
                desc(0x40_0000, 512, 0),
                desc(0x30_0000, 1, F_WRITE),
            ],
        );
        assert_eq!(status, VIRTIO_BLK_S_IOERR, "write to a read-only disk");
        write_header(&m, 0x10_0000, 77, 0);
        let (status, _) = run(
            &mut block,
            &m,
            &[desc(0x10_0000, 16, 0), desc(0x30_0000, 1, F_WRITE)],
        );
        assert_eq!(status, VIRTIO_BLK_S_UNSUPP);
        write_header(&m, 0x10_0000, VIRTIO_BLK_T_GET_ID, 0);
        let (status, len) = run(
            &mut block,
            &m,
            &[
                desc(0x10_0000, 16, 0),
                desc(0x20_0000, 64, F_WRITE),
                desc(0x30_0000, 1, F_WRITE),
            ],
        );
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 21));
        let mut id = [0u8; 6];
        m.read_slice(&mut id, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&id, b"cocoon");
        assert_eq!(block.metrics.errors, 1);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn config_space_reports_capacity_and_reads_past_it_are_zero() {
        let path = image(&[0u8; 4096 + 100]);
        let block = Block::new(Disk::open(&path, true).unwrap());
        let mut cap = [0u8; 8];
        block.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut past = [0xffu8; 4];
        block.read_config(14, &mut past);
        assert_eq!(past, [0, 0, 0, 0]);
        block.read_config(u64::MAX, &mut past);
        assert_eq!(past, [0; 4]);
        assert_ne!(block.features() & VIRTIO_BLK_F_RO, 0);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_writable_image_cannot_be_opened_twice() {
        let path = image(&[0u8; 512]);
        let _first = Disk::open(&path, false).unwrap();
        assert!(matches!(
            Disk::open(&path, false),
            Err(super::super::DiskError::Locked { .. })
        ));
        std::fs::remove_file(path).unwrap();
    }
}
