//! The virtio-fs device: FUSE requests from the guest's queues to the file server.
//!
//! Each chain is one request: device-readable buffers (the FUSE header, its arguments, a
//! write's data), then device-writable ones for the reply. The request is copied out of guest
//! memory (bounded) before it is parsed, so the guest cannot change it under the server.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::protocol;
use super::server::{MAX_IO, Server, Share, ShareError};
use crate::devices::virtio::persist::DeviceState;
use crate::devices::virtio::{VIRTIO_F_VERSION_1, VirtioDevice, serve_chains};

pub const VIRTIO_ID_FS: u32 = 26;
/// The high-priority queue (FORGET, INTERRUPT) and one request queue. The request queue is
/// large because a guest without indirect descriptors puts a 1 MiB write in one chain of
/// 4 KiB pages, and Linux caps its `max_pages` by the queue size.
pub const QUEUE_SIZES: [u16; 2] = [128, 1024];
/// Largest request accepted: a write of `MAX_IO` and its header and arguments.
pub const MAX_REQUEST: usize = MAX_IO as usize + 4096;
/// The tag the guest mounts (`mount -t virtiofs cocoon /mnt`).
pub const TAG_LEN: usize = 36;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FsMetrics {
    pub requests: u64,
    /// Chains dropped unanswered: no parsable header, buffers out of guest memory or out of
    /// order, a request or reply too big for its buffers.
    pub bad_requests: u64,
}

pub struct Fs {
    tag: String,
    server: Server,
    pub metrics: FsMetrics,
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {0:?}: 1 to {TAG_LEN} bytes, no NUL")]
    Tag(String),
    #[error(transparent)]
    Share(#[from] ShareError),
}

impl Fs {
    pub fn new(tag: &str) -> Result<Fs, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN || tag.contains('\0') {
            return Err(FsError::Tag(tag.into()));
        }
        Ok(Fs {
            tag: tag.into(),
            server: Server::new(),
            metrics: FsMetrics::default(),
        })
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Shares another host directory or file with the guest, as `/<name>` of the mount; the
    /// guest sees it at its next lookup, so shares can be added to a running (or restored) VM.
    pub fn add_share(&mut self, share: Share) -> Result<(), FsError> {
        self.server.add_share(share).map_err(FsError::from)
    }

    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Serves one chain; returns the used length (0 for a chain dropped unanswered).
    fn serve(&mut self, mem: &GuestMemoryMmap, chain: impl Iterator<Item = Descriptor>) -> u32 {
        self.metrics.requests += 1;
        match self.exchange(mem, chain) {
            Some(n) => n,
            None => {
                self.metrics.bad_requests += 1;
                0
            }
        }
    }

    fn exchange(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: impl Iterator<Item = Descriptor>,
    ) -> Option<u32> {
        let mut request = Vec::new();
        let mut writable = Vec::new();
        let mut room = 0usize;
        for desc in chain {
            let len = desc.len() as usize;
            if desc.is_write_only() {
                room = room.checked_add(len)?;
                writable.push(desc);
                continue;
            }
            // Readable buffers come first (virtio 1.x, 2.7.4).
            if !writable.is_empty() || request.len() + len > MAX_REQUEST {
                return None;
            }
            let start = request.len();
            request.resize(start + len, 0);
            mem.read_slice(&mut request[start..], desc.addr()).ok()?;
        }
        let reply = self.server.handle(&request)?;
        let reply = if reply.len() > room {
            // The guest's buffers cannot take the answer: tell it so, if even that fits.
            let (header, _) = protocol::parse_header(&request).ok()?;
            let error = protocol::Reply::error(header.unique, libc::ERANGE);
            if error.len() > room {
                return None;
            }
            error
        } else {
            reply
        };
        let mut done = 0usize;
        for desc in writable {
            if done == reply.len() {
                break;
            }
            let n = (desc.len() as usize).min(reply.len() - done);
            mem.write_slice(&reply[done..done + n], desc.addr()).ok()?;
            done += n;
        }
        Some(done as u32)
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }
        let mut config = [0u8; TAG_LEN + 4];
        config[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        crate::devices::virtio::read_config_space(&config, offset, data);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        serve_chains(queue, mem, |chain: DescriptorChain<&GuestMemoryMmap>| {
            self.serve(mem, chain)
        })
    }

    fn reset(&mut self) {
        // A driver reset ends the FUSE session: the guest's node ids mean nothing any more.
        self.server.reset();
    }

    fn as_fs_mut(&mut self) -> Option<&mut Fs> {
        Some(self)
    }

    fn save(&self) -> DeviceState {
        DeviceState::Fs(super::persist::FsState {
            tag: self.tag.clone(),
            in_use: self.server.in_use(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::request::tests::{F_WRITE, desc, mem};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    fn run(fs: &mut Fs, m: &GuestMemoryMmap, descs: &[virtio_queue::desc::RawDescriptor]) -> u32 {
        let q = MockSplitQueue::new(m, 16);
        q.build_desc_chain(descs).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        assert!(fs.process_queue(0, std::slice::from_mut(&mut queue), m));
        m.read_obj(q.used_addr().unchecked_add(8)).unwrap()
    }

    fn getattr_root(m: &GuestMemoryMmap, at: u64) {
        let mut req = Vec::new();
        req.extend_from_slice(&56u32.to_le_bytes());
        req.extend_from_slice(&protocol::opcode::GETATTR.to_le_bytes());
        req.extend_from_slice(&5u64.to_le_bytes());
        req.extend_from_slice(&protocol::ROOT_ID.to_le_bytes());
        req.extend_from_slice(&[0; 32]);
        m.write_slice(&req, GuestAddress(at)).unwrap();
    }

    #[test]
    fn a_request_split_over_buffers_gets_its_reply() {
        let m = mem();
        let mut fs = Fs::new("cocoon").unwrap();
        getattr_root(&m, 0x10_0000);
        // The request in two pieces, the reply over two buffers.
        let len = run(
            &mut fs,
            &m,
            &[
                desc(0x10_0000, 20, 0),
                desc(0x10_0014, 36, 0),
                desc(0x20_0000, 16, F_WRITE),
                desc(0x30_0000, 4096, F_WRITE),
            ],
        );
        assert_eq!(len, 16 + 104, "out header and fuse_attr_out");
        let mut header = [0u8; 16];
        m.read_slice(&mut header, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(u32::from_le_bytes(header[0..4].try_into().unwrap()), 120);
        assert_eq!(i32::from_le_bytes(header[4..8].try_into().unwrap()), 0);
        let mode: u32 = m.read_obj(GuestAddress(0x30_0000 + 16 + 60)).unwrap();
        assert_eq!(mode, libc::S_IFDIR | 0o555);
    }

    #[test]
    fn bad_chains_are_dropped_or_answered_with_errors() {
        let mut fs = Fs::new("cocoon").unwrap();
        // A reply that does not fit: an error header, which does.
        let m = mem();
        getattr_root(&m, 0x10_0000);
        let len = run(
            &mut fs,
            &m,
            &[desc(0x10_0000, 56, 0), desc(0x20_0000, 32, F_WRITE)],
        );
        assert_eq!(len, 16);
        let error: i32 = m.read_obj(GuestAddress(0x20_0004)).unwrap();
        assert_eq!(error, -libc::ERANGE);
        // Not even room for an error; a readable buffer after a writable one; buffers outside
        // guest memory; a request over the bound: dropped.
        for descs in [
            vec![desc(0x10_0000, 56, 0), desc(0x20_0000, 8, F_WRITE)],
            vec![
                desc(0x20_0000, 16, F_WRITE),
                desc(0x10_0000, 56, 0),
                desc(0x30_0000, 4096, F_WRITE),
            ],
            vec![desc(u64::MAX - 8, 56, 0), desc(0x20_0000, 4096, F_WRITE)],
            vec![
                desc(0x10_0000, (MAX_REQUEST + 1) as u32, 0),
                desc(0x20_0000, 4096, F_WRITE),
            ],
        ] {
            let m = mem();
            getattr_root(&m, 0x10_0000);
            assert_eq!(run(&mut fs, &m, &descs), 0);
        }
        assert_eq!(fs.metrics.bad_requests, 4);
        assert!(Fs::new("").is_err());
        assert!(Fs::new(&"x".repeat(37)).is_err());
    }

    #[test]
    fn the_config_space_holds_the_tag_and_one_request_queue() {
        let fs = Fs::new("cocoon").unwrap();
        let mut config = [0xffu8; 40];
        fs.read_config(0, &mut config);
        assert_eq!(&config[..7], b"cocoon\0");
        assert!(config[6..36].iter().all(|&b| b == 0));
        assert_eq!(u32::from_le_bytes(config[36..].try_into().unwrap()), 1);
    }
}
