//! Turns fuzz input into a guest memory and a descriptor chain the way a hostile driver could
//! lay them out: the first bytes describe up to 8 descriptors (address, length, flags, next),
//! the rest is guest memory content at 0x10000.

use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: usize = 1 << 20;
const DESC_BYTES: usize = 16;

pub fn memory(data: &[u8]) -> Option<(GuestMemoryMmap, Vec<RawDescriptor>)> {
    let (&count, rest) = data.split_first()?;
    let count = (count % 8) as usize + 1;
    if rest.len() < count * DESC_BYTES {
        return None;
    }
    let (table, content) = rest.split_at(count * DESC_BYTES);
    let descs = table
        .chunks(DESC_BYTES)
        .map(|d| {
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap()) % (2 * MEM_SIZE as u64);
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
            let flags = u16::from_le_bytes(d[12..14].try_into().unwrap()) & 0x7;
            let next = u16::from_le_bytes(d[14..16].try_into().unwrap()) % 16;
            RawDescriptor::from(Descriptor::new(addr, len, flags, next))
        })
        .collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let n = content.len().min(MEM_SIZE - 0x10000);
    mem.write_slice(&content[..n], GuestAddress(0x10000)).ok()?;
    Some((mem, descs))
}

/// The first available chain of a 16-entry queue holding `descs` as written.
pub fn with_chain<R>(
    mem: &GuestMemoryMmap,
    descs: &[RawDescriptor],
    f: impl FnOnce(DescriptorChain<&GuestMemoryMmap>) -> R,
) -> Option<R> {
    let q = MockSplitQueue::new(mem, 16);
    q.add_desc_chains(descs, 0).ok()?;
    let mut queue: Queue = q.create_queue().ok()?;
    let chain = queue.iter(mem).ok()?.next()?;
    Some(f(chain))
}
