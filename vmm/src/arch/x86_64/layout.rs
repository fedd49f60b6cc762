//! Where things live in guest physical memory.
//!
//! Low memory holds the boot structures; the kernel loads at its ELF physical address (16 MiB for
//! our vmlinux); the initramfs goes at the top of the low RAM region. Devices live in the 32-bit
//! MMIO gap below 4 GiB, which guest RAM skips; RAM beyond the gap continues at 4 GiB.

/// Global descriptor table used at PVH entry.
pub const GDT_START: u64 = 0x500;
/// The PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH module list (one entry: the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// The PVH memory map (e820-style entries).
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Room for at most this many memory map entries.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 64;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we accept (the kernel's COMMAND_LINE_SIZE on x86 is 2048).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Top of conventional memory: the last KiB below 640 KiB is where the kernel looks for the MP
/// table, so usable low RAM ends here.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of the legacy VGA/BIOS hole; RAM resumes at 1 MiB.
pub const LEGACY_HOLE_START: u64 = 0xa_0000;
/// First byte of "high" memory (1 MiB): the kernel must load above it.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap: no RAM from here up to 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The guest status device (boot marker, shutdown notice): first page of the MMIO gap.
pub const GUEST_STATUS_START: u64 = cocoon_vmm_abi::guest_status::GUEST_STATUS_ADDR;
/// virtio-mmio devices follow, one page each.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START + 0x1000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The first IOAPIC pin given to virtio devices (0-4 are the PIT, keyboard, cascade, serial).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// The last IOAPIC pin (the in-kernel IOAPIC has 24).
pub const LAST_IRQ: u32 = 23;
/// Most virtio-mmio devices one VM can have (one IRQ each).
pub const VIRTIO_MAX_DEVICES: usize = (LAST_IRQ - VIRTIO_FIRST_IRQ + 1) as usize;
/// IOAPIC and local APIC MMIO addresses (the architectural defaults).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// Where KVM on Intel puts its three-page TSS (must be outside RAM, inside the gap).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Serial port (COM1) and its IRQ.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// i8042 keyboard controller data and command ports.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// The virtio-mmio window of device `index`.
pub fn virtio_mmio_base(index: usize) -> u64 {
    VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE
}

/// The IOAPIC pin of virtio device `index`.
pub fn virtio_irq(index: usize) -> u32 {
    VIRTIO_FIRST_IRQ + index as u32
}
