//! The vsock TX packet parser and RX buffer writer never panic, whatever the guest lays out.
#![no_main]

mod chain;

use cocoon_vmm::devices::virtio::vsock::packet::{Header, RxBuffer, read_tx};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mem, descs)) = chain::memory(data) else { return };
    chain::with_chain(&mem, &descs, |c| {
        if let Ok((header, payload)) = read_tx(c, &mem) {
            assert_eq!(header.len as usize, payload.len());
        }
    });
    chain::with_chain(&mem, &descs, |c| {
        if let Ok(rx) = RxBuffer::new(c, &mem) {
            let used = rx.write(&mem, Header::default(), &data[..data.len().min(rx.payload_room())]);
            assert!(used as usize <= 44 + rx.payload_room());
        }
    });
});
