//! The entropy device: every writable buffer the guest offers is filled from `getrandom`.

use virtio_queue::Queue;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use super::persist::RngState;
use crate::devices::virtio::persist::DeviceState;
use crate::devices::virtio::{VIRTIO_F_VERSION_1, VirtioDevice, serve_chains};

pub const VIRTIO_ID_RNG: u32 = 4;
pub const QUEUE_SIZE: u16 = 64;
/// At most this much entropy per request: bounds the work one guest kick can cause.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// Per-device counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RngMetrics {
    pub requests: u64,
    pub bytes: u64,
    pub bad_requests: u64,
}

#[derive(Default)]
pub struct Rng {
    queue_sizes: [u16; 1],
    pub metrics: RngMetrics,
}

impl Rng {
    pub fn new() -> Self {
        Rng {
            queue_sizes: [QUEUE_SIZE],
            metrics: RngMetrics::default(),
        }
    }

    /// Fills the chain's writable buffers; returns the bytes written. Read-only descriptors and
    /// buffers outside guest memory end the request (what was written so far is reported).
    fn serve(&mut self, mem: &GuestMemoryMmap, chain: impl Iterator<Item = Descriptor>) -> u32 {
        self.metrics.requests += 1;
        let mut written = 0usize;
        let mut entropy = [0u8; 4096];
        for desc in chain {
            if !desc.is_write_only() {
                self.metrics.bad_requests += 1;
                break;
            }
            let len = (desc.len() as usize).min(MAX_BYTES_PER_REQUEST - written);
            let mut offset = 0usize;
            while offset < len {
                let n = (len - offset).min(entropy.len());
                let target = desc.addr().checked_add(offset as u64);
                let ok = fill_random(&mut entropy[..n]).is_ok()
                    && target.is_some_and(|addr| mem.write_slice(&entropy[..n], addr).is_ok());
                if !ok {
                    self.metrics.bad_requests += 1;
                    self.metrics.bytes += written as u64;
                    return written as u32;
                }
                written += n;
                offset += n;
            }
            if written >= MAX_BYTES_PER_REQUEST {
                break;
            }
        }
        self.metrics.bytes += written as u64;
        written as u32
    }
}

/// `getrandom(2)` until `buf` is full.
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which we own.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        } else {
            done += n as usize;
        }
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        serve_chains(queue, mem, |chain| self.serve(mem, chain))
    }

    fn save(&self) -> DeviceState {
        DeviceState::Rng(RngState {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::request::tests::{F_WRITE, desc, mem};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    /// Runs one chain through the device; returns the used length.
    fn run(rng: &mut Rng, m: &GuestMemoryMmap, descs: &[virtio_queue::desc::RawDescriptor]) -> u32 {
        let q = MockSplitQueue::new(m, 16);
        q.build_desc_chain(descs).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        assert!(rng.process_queue(0, std::slice::from_mut(&mut queue), m));
        m.read_obj(q.used_addr().unchecked_add(8)).unwrap()
    }

    #[test]
    fn writable_buffers_are_filled() {
        let m = mem();
        let mut rng = Rng::new();
        let len = run(
            &mut rng,
            &m,
            &[desc(0x10_0000, 512, F_WRITE), desc(0x20_0000, 100, F_WRITE)],
        );
        assert_eq!(len, 612);
        let mut got = [0u8; 512];
        m.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert!(got.iter().any(|b| *b != 0), "no entropy written");
        assert_eq!(rng.metrics.bytes, 612);
    }

    #[test]
    fn requests_are_capped_and_bad_buffers_end_them() {
        // A fresh guest memory per request, so each mock queue holds exactly one chain.
        let mut rng = Rng::new();
        let len = run(&mut rng, &mem(), &[desc(0x10_0000, 1 << 20, F_WRITE)]);
        assert_eq!(len as usize, MAX_BYTES_PER_REQUEST);
        let len = run(&mut rng, &mem(), &[desc(0x10_0000, 16, 0)]);
        assert_eq!(len, 0, "a device-readable buffer gets nothing");
        let len = run(&mut rng, &mem(), &[desc(u64::MAX - 8, 4096, F_WRITE)]);
        assert_eq!(len, 0, "a buffer outside guest memory gets nothing");
        assert_eq!(rng.metrics.bad_requests, 2);
    }

    /// A queue that never runs dry (each chain served announces another, as when a buffer the
    /// device writes covers the avail ring) ends the pass at the bound, with the next chain
    /// left available.
    #[test]
    fn an_endless_queue_ends_the_pass_at_the_bound() {
        use crate::devices::virtio::{MAX_CHAINS_PER_PASS, serve_chains};
        use virtio_queue::QueueT;
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        q.build_desc_chain(&[desc(0x8000, 16, F_WRITE)]).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        // The mock's used ring overlaps its avail ring past 8 entries: moved clear of it.
        queue.set_ready(false);
        queue.set_used_ring_address(Some(0x2000), Some(0));
        queue.set_ready(true);
        let avail_idx = q.avail_addr().unchecked_add(2);
        let mut served = 0usize;
        let used = serve_chains(&mut queue, &m, |_chain| {
            served += 1;
            let idx: u16 = m.read_obj(avail_idx).unwrap();
            m.write_obj(idx.wrapping_add(1), avail_idx).unwrap();
            16
        });
        assert!(used);
        assert_eq!(served, MAX_CHAINS_PER_PASS);
        assert_eq!(
            usize::from(queue.next_avail()),
            MAX_CHAINS_PER_PASS,
            "the chain not served stays available"
        );
    }

    /// An avail index further ahead than the ring holds yields no chain: the pass ends instead
    /// of looking again for ever (found by the `mmio_transport` fuzz target).
    #[test]
    fn an_avail_index_too_far_ahead_ends_the_pass() {
        use crate::devices::virtio::serve_chains;
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        q.build_desc_chain(&[desc(0x8000, 16, F_WRITE)]).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        m.write_obj(100u16, q.avail_addr().unchecked_add(2))
            .unwrap();
        let mut served = 0;
        assert!(!serve_chains(&mut queue, &m, |_| {
            served += 1;
            0
        }));
        assert_eq!(served, 0);
    }
}
