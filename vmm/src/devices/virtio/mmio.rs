//! The virtio-mmio transport (virtio 1.x, version 2 register layout).
//!
//! Every register write comes from the guest and is treated as hostile: wrong widths and
//! offsets are ignored, queue set-up is only accepted in the state the spec allows it, a
//! FEATURES_OK with features we never offered is refused, and DRIVER_OK with a queue whose
//! rings fall outside guest memory marks the device as needing reset instead of activating it.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, status};
use crate::bus::BusDevice;

pub const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
pub const MMIO_VERSION: u32 = 2;
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"COCO");

// Register offsets.
pub const REG_MAGIC: u64 = 0x00;
pub const REG_VERSION: u64 = 0x04;
pub const REG_DEVICE_ID: u64 = 0x08;
pub const REG_VENDOR_ID: u64 = 0x0c;
pub const REG_DEVICE_FEATURES: u64 = 0x10;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x14;
pub const REG_DRIVER_FEATURES: u64 = 0x20;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x24;
pub const REG_QUEUE_SEL: u64 = 0x30;
pub const REG_QUEUE_NUM_MAX: u64 = 0x34;
pub const REG_QUEUE_NUM: u64 = 0x38;
pub const REG_QUEUE_READY: u64 = 0x44;
pub const REG_QUEUE_NOTIFY: u64 = 0x50;
pub const REG_INTERRUPT_STATUS: u64 = 0x60;
pub const REG_INTERRUPT_ACK: u64 = 0x64;
pub const REG_STATUS: u64 = 0x70;
pub const REG_QUEUE_DESC_LOW: u64 = 0x80;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x84;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x90;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x94;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0xa0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0xa4;
pub const REG_CONFIG_GENERATION: u64 = 0xfc;
pub const CONFIG_SPACE: u64 = 0x100;

// Fields are visible to the rest of `devices::virtio` so `persist.rs` can save and rebuild a
// transport without this file growing snapshot code.
pub struct MmioTransport {
    pub(super) device: Box<dyn VirtioDevice>,
    pub(super) mem: GuestMemoryMmap,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) queues: Vec<Queue>,
    pub(super) queue_select: u32,
    pub(super) device_features_select: u32,
    pub(super) driver_features_select: u32,
    pub(super) driver_features: u64,
    pub(super) status: u32,
    pub(super) activated: bool,
    /// `ConfigGeneration`: bumped whenever the device changes its configuration space under
    /// the driver (a disk swap), so a driver that read the space across the change reads it
    /// again. Never reset: a driver reading across a device reset must not see an old value.
    pub(super) config_generation: u32,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            // A device declaring an impossible queue size is a bug in the VMM, not guest input;
            // such a queue is left out and the device simply has fewer queues.
            .filter_map(|&max| Queue::new(max).ok())
            .collect();
        MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            activated: false,
            config_generation: 0,
        }
    }

    /// The virtio device type of the device behind the transport.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The driver kicked queue `index` (through the ioeventfd or a QueueNotify write).
    pub fn notify(&mut self, index: usize) {
        if !self.activated {
            return;
        }
        if !self.queues.get(index).is_some_and(|q| q.ready()) {
            return;
        }
        let used = self
            .device
            .process_queue(index, &mut self.queues, &self.mem);
        self.interrupt_if(used);
    }

    /// The device's host side has events (see `VirtioDevice::host_event_fd`).
    pub fn host_event(&mut self) {
        if self.activated {
            let used = self.device.process_host_events(&mut self.queues, &self.mem);
            self.interrupt_if(used);
        }
    }

    /// See `VirtioDevice::vm_ended`.
    pub fn vm_ended(&mut self) {
        self.device.vm_ended();
    }

    pub fn host_event_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.host_event_fd()
    }

    pub(super) fn interrupt_if(&mut self, used: bool) {
        // Without EVENT_IDX, needs_notification honours the driver's VIRTQ_AVAIL_F_NO_INTERRUPT;
        // a ring we cannot read is treated as "interrupt anyway".
        let mem = &self.mem;
        if used
            && self
                .queues
                .iter_mut()
                .any(|q| q.ready() && q.needs_notification(mem).unwrap_or(true))
        {
            self.interrupt.signal_used_ring();
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may only change after FEATURES_OK and before DRIVER_OK, on a queue that
    /// is not yet ready.
    fn queue_config_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0
            && self.status & status::DRIVER_OK == 0
            && self.status & status::FAILED == 0
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.acknowledge(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits can only be added (until a reset); anything else is ignored.
        if value & self.status != self.status {
            return;
        }
        let added = value & !self.status;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let sane = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !sane {
                // Leave FEATURES_OK clear: the driver reads it back and gives up.
                self.status = value & !status::FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if added & status::DRIVER_OK != 0 && self.status & status::FEATURES_OK != 0 {
            self.try_activate();
        }
    }

    fn try_activate(&mut self) {
        let mem = &self.mem;
        let queues_ok = self.queues.iter().all(|q| !q.ready() || q.is_valid(mem));
        if queues_ok {
            self.device.activate(self.driver_features);
            self.activated = true;
        } else {
            tracing::warn!(
                "virtio device {}: a queue is outside guest memory",
                self.device.device_type()
            );
            self.status |= status::DEVICE_NEEDS_RESET;
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| q.max_size().into()),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| q.ready().into()),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_DRIVER_FEATURES => {
                if self.status & (status::FEATURES_OK | status::DRIVER_OK) != 0 {
                    return;
                }
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NOTIFY => self.notify(value as usize),
            REG_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            REG_STATUS => self.set_status(value),
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => {
                if !self.queue_config_allowed() {
                    return;
                }
                let Some(q) = self.selected_queue() else {
                    return;
                };
                if offset == REG_QUEUE_READY {
                    q.set_ready(value == 1);
                    return;
                }
                if q.ready() {
                    return;
                }
                match offset {
                    // virtio-queue refuses sizes that are not a power of two or exceed the max.
                    REG_QUEUE_NUM => q.set_size(value as u16),
                    REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
                    REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
                    REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
                    REG_QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
                    REG_QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
                    REG_QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.status & status::DRIVER_OK == 0 || self.activated {
                self.device.write_config(offset - CONFIG_SPACE, data);
            }
        } else if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    struct Dummy {
        queue_sizes: Vec<u16>,
        activated_with: Option<u64>,
        processed: usize,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.queue_sizes
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0x5
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 0x10);
        }
        fn activate(&mut self, features: u64) {
            self.activated_with = Some(features);
        }
        fn process_queue(&mut self, _: usize, _: &mut [Queue], _: &GuestMemoryMmap) -> bool {
            self.processed += 1;
            true
        }
        fn save(&self) -> crate::devices::virtio::persist::DeviceState {
            crate::devices::virtio::persist::DeviceState::Rng(
                crate::devices::virtio::rng::persist::RngState {},
            )
        }
    }

    fn transport() -> MmioTransport {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dev = Dummy {
            queue_sizes: vec![16, 8],
            activated_with: None,
            processed: 0,
        };
        MmioTransport::new(
            Box::new(dev),
            mem,
            Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
        )
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        write(t, REG_STATUS, status::ACKNOWLEDGE);
        write(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write(t, REG_DRIVER_FEATURES_SEL, 0);
        write(t, REG_DRIVER_FEATURES, features as u32);
        write(t, REG_DRIVER_FEATURES_SEL, 1);
        write(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        write(
            t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u32) {
        write(t, REG_QUEUE_SEL, index);
        write(t, REG_QUEUE_NUM, size);
        write(t, REG_QUEUE_DESC_LOW, base);
        write(t, REG_QUEUE_DRIVER_LOW, base + 0x1000);
        write(t, REG_QUEUE_DEVICE_LOW, base + 0x2000);
        write(t, REG_QUEUE_READY, 1);
    }

    const ALL_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identity_registers() {
        let mut t = transport();
        assert_eq!(read(&mut t, REG_MAGIC), MAGIC_VALUE);
        assert_eq!(read(&mut t, REG_VERSION), 2);
        assert_eq!(read(&mut t, REG_DEVICE_ID), 42);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 1);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 5);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 0);
        write(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 8);
        write(&mut t, REG_QUEUE_SEL, 99);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 0);
        let mut cfg = [0u8; 2];
        t.read(CONFIG_SPACE + 3, &mut cfg);
        assert_eq!(cfg, [0x13, 0x13]);
    }

    #[test]
    fn full_handshake_activates() {
        let mut t = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 1);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        write(&mut t, REG_STATUS, ALL_OK);
        assert!(t.is_activated());
        assert_eq!(read(&mut t, REG_STATUS), ALL_OK);
        write(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(
            read(&mut t, REG_INTERRUPT_STATUS) & super::super::INT_USED_RING,
            1
        );
        write(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 0);
        // Queue 1 never set ready: kicks are ignored; out-of-range kicks too.
        write(&mut t, REG_QUEUE_NOTIFY, 1);
        write(&mut t, REG_QUEUE_NOTIFY, 12345);
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn unoffered_or_legacy_features_are_refused() {
        let mut t = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 0x8);
        assert_eq!(read(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
        let mut t = transport();
        negotiate(&mut t, 0x1);
        assert_eq!(read(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn queue_outside_memory_needs_reset() {
        let mut t = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 16, 0xfff_0000);
        write(&mut t, REG_STATUS, ALL_OK);
        assert!(!t.is_activated());
        assert_ne!(read(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        write(&mut t, REG_STATUS, 0);
        assert_eq!(read(&mut t, REG_STATUS), 0);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn queue_config_only_between_features_ok_and_driver_ok() {
        let mut t = transport();
        // Before FEATURES_OK: ignored.
        setup_queue(&mut t, 0, 16, 0x1_0000);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        // Sizes that are not a power of two or exceed the max are not taken.
        write(&mut t, REG_QUEUE_SEL, 0);
        write(&mut t, REG_QUEUE_NUM, 17);
        write(&mut t, REG_QUEUE_NUM, 32);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        write(&mut t, REG_STATUS, ALL_OK);
        assert!(t.is_activated());
        // After DRIVER_OK the driver cannot move the rings.
        write(&mut t, REG_QUEUE_DESC_LOW, 0xdead_0000);
        assert_eq!(t.queues[0].desc_table(), 0x1_0000);
    }

    #[test]
    fn status_bits_cannot_be_cleared_and_bad_widths_are_ignored() {
        let mut t = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        write(&mut t, REG_STATUS, status::ACKNOWLEDGE);
        assert_ne!(read(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
        t.write(REG_STATUS, &[0]);
        t.write(REG_STATUS + 1, &[0, 0, 0, 0]);
        assert_ne!(read(&mut t, REG_STATUS), 0);
        let mut narrow = [0xaau8; 2];
        t.read(REG_MAGIC, &mut narrow);
        assert_eq!(narrow, [0, 0]);
    }

    #[test]
    fn driver_features_are_frozen_after_features_ok() {
        let mut t = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 1);
        write(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        write(&mut t, REG_DRIVER_FEATURES, 0x5);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        write(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(t.driver_features, VIRTIO_F_VERSION_1 | 1);
    }
}
