//! The virtio-blk request parser never panics, and what it accepts is within the disk and
//! guest memory.
#![no_main]

mod chain;

use cocoon_vmm::devices::virtio::block::request::{Request, RequestKind, SECTOR_SIZE};
use libfuzzer_sys::fuzz_target;

const CAPACITY: u64 = 2048;

fuzz_target!(|data: &[u8]| {
    let Some((mem, descs)) = chain::memory(data) else { return };
    let read_only = data.first().is_some_and(|b| b & 0x80 != 0);
    chain::with_chain(&mem, &descs, |c| {
        if let Ok(req) = Request::parse(c, &mem, CAPACITY, read_only) {
            if matches!(req.kind, RequestKind::In | RequestKind::Out) {
                assert!(req.data_len > 0 && req.data_len % SECTOR_SIZE == 0);
                assert!(req.sector + req.data_len / SECTOR_SIZE <= CAPACITY);
                assert!(!(read_only && req.kind == RequestKind::Out));
            }
        }
    });
});
