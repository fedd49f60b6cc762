//! The virtio-mmio register interface with real devices behind it (rng, block on a scratch
//! file, net without a TAP, vsock with its muxer), driven the way a hostile driver could:
//! register reads and writes of any width and offset, guest memory written under the rings,
//! queue kicks, and now and then a correct driver set-up so the fuzzer gets past negotiation.
//! It must never panic, and the transport's state must stay within the spec.
#![no_main]

mod input;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use cocoon_vmm::bus::BusDevice;
use cocoon_vmm::devices::virtio::block::Block;
use cocoon_vmm::devices::virtio::block::disk::Disk;
use cocoon_vmm::devices::virtio::mmio::*;
use cocoon_vmm::devices::virtio::net::Net;
use cocoon_vmm::devices::virtio::rng::Rng;
use cocoon_vmm::devices::virtio::vsock::Vsock;
use cocoon_vmm::devices::virtio::{Interrupt, VirtioDevice, status};
use input::Input;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: u64 = 256 << 10;
const MAX_OPS: usize = 128;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cocoon-fuzz-mmio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("disk.img"), vec![0u8; 64 << 10]).unwrap();
        dir
    })
}

fn device(kind: u8) -> Box<dyn VirtioDevice> {
    match kind % 4 {
        0 => Box::new(Rng::new()),
        1 => Box::new(Block::new(
            Disk::open(&scratch().join("disk.img"), kind & 0x10 != 0).unwrap(),
        )),
        2 => Box::new(Net::new(None, [0x02, 0, 0, 0, 0, 1]).unwrap()),
        _ => Box::new(Vsock::new(3, &scratch().join("v.sock")).unwrap()),
    }
}

const REGISTERS: [u64; 22] = [
    REG_MAGIC,
    REG_VERSION,
    REG_DEVICE_ID,
    REG_DEVICE_FEATURES,
    REG_DEVICE_FEATURES_SEL,
    REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL,
    REG_QUEUE_SEL,
    REG_QUEUE_NUM_MAX,
    REG_QUEUE_NUM,
    REG_QUEUE_READY,
    REG_QUEUE_NOTIFY,
    REG_INTERRUPT_STATUS,
    REG_INTERRUPT_ACK,
    REG_STATUS,
    REG_QUEUE_DESC_LOW,
    REG_QUEUE_DESC_HIGH,
    REG_QUEUE_DRIVER_LOW,
    REG_QUEUE_DRIVER_HIGH,
    REG_QUEUE_DEVICE_LOW,
    REG_QUEUE_DEVICE_HIGH,
    REG_CONFIG_GENERATION,
];

fn write(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn read(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

/// What a correct driver does: reset, negotiate everything offered, rings for every queue
/// at 16 KiB apart with the given size, DRIVER_OK.
fn proper_setup(t: &mut MmioTransport, size: u32) {
    write(t, REG_STATUS, 0);
    write(t, REG_STATUS, status::ACKNOWLEDGE);
    write(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
    for sel in 0..2 {
        write(t, REG_DEVICE_FEATURES_SEL, sel);
        let offered = read(t, REG_DEVICE_FEATURES);
        write(t, REG_DRIVER_FEATURES_SEL, sel);
        write(t, REG_DRIVER_FEATURES, offered);
    }
    let negotiated = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write(t, REG_STATUS, negotiated);
    for q in 0..t.queue_count() as u32 {
        let base = q * 0x4000;
        write(t, REG_QUEUE_SEL, q);
        write(t, REG_QUEUE_NUM, size);
        write(t, REG_QUEUE_DESC_LOW, base);
        write(t, REG_QUEUE_DRIVER_LOW, base + 0x1000);
        write(t, REG_QUEUE_DEVICE_LOW, base + 0x2000);
        write(t, REG_QUEUE_READY, 1);
    }
    write(t, REG_STATUS, negotiated | status::DRIVER_OK);
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(kind) = input.u8() else { return };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let mut t = MmioTransport::new(device(kind), mem.clone(), interrupt);
    for _ in 0..MAX_OPS {
        let Some(op) = input.u8() else { break };
        match op % 8 {
            0 | 1 => {
                let reg = REGISTERS[usize::from(input.u8().unwrap_or(0)) % REGISTERS.len()];
                let mut value = input.u32();
                if matches!(
                    reg,
                    REG_QUEUE_DESC_LOW | REG_QUEUE_DRIVER_LOW | REG_QUEUE_DEVICE_LOW
                ) && op & 0x80 == 0
                {
                    value %= MEM_SIZE as u32;
                }
                write(&mut t, reg, value);
            }
            2 => {
                // Any offset and width, config space included.
                let offset = u64::from(input.u32() % 0x400);
                let width = [1usize, 2, 4, 8][usize::from(input.u8().unwrap_or(0)) % 4];
                if op & 0x80 != 0 {
                    let mut buf = [0u8; 8];
                    t.read(offset, &mut buf[..width]);
                } else {
                    let bytes = input.bytes(width).to_vec();
                    t.write(offset, &bytes);
                }
            }
            3 => {
                let addr = u64::from(input.u32()) % MEM_SIZE;
                let len = usize::from(input.u8().unwrap_or(0));
                let bytes = input.bytes(len).to_vec();
                let _ = mem.write_slice(&bytes, GuestAddress(addr));
            }
            4 => {
                t.notify(usize::from(input.u8().unwrap_or(0) % 4));
            }
            5 => t.host_event(),
            6 => proper_setup(&mut t, 1 << (input.u8().unwrap_or(0) % 9)),
            _ => {
                let reg = REGISTERS[usize::from(input.u8().unwrap_or(0)) % REGISTERS.len()];
                read(&mut t, reg);
            }
        }
        assert_eq!(read(&mut t, REG_MAGIC), MAGIC_VALUE);
        if t.is_activated() {
            let s = t.status();
            assert!(
                s & status::FEATURES_OK != 0 && s & status::DRIVER_OK != 0,
                "status {s:#x}"
            );
        }
    }
    t.vm_ended();
});
