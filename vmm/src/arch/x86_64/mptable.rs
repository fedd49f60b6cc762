//! The Intel MultiProcessor table: how a guest without ACPI learns its CPUs, the IOAPIC and how
//! ISA interrupts are wired. Written into the last KiB of conventional memory, where the kernel
//! scans for the floating pointer.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_DEFAULT_PHYS_BASE, EBDA_START, IOAPIC_ADDR, LAST_IRQ, LEGACY_HOLE_START};

/// Largest vCPU count whose table still fits in the KiB the kernel scans.
pub const MAX_CPUS: u8 = 32;

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = 0x201; // FPU and APIC present
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ALL_LOCAL_APICS: u8 = 0xff;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in the MP table (at most {MAX_CPUS})")]
    TooManyCpus(u8),
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// The table bytes for `cpus` vCPUs when placed at `base`: floating pointer, then configuration
/// table with processors, the ISA bus, the IOAPIC and interrupt routing.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus + 1;

    let mut entries: Vec<u8> = Vec::new();
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for irq in 0..=LAST_IRQ as u8 {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        entries.extend_from_slice(&[
            ENTRY_LOCAL_INTERRUPT,
            kind,
            0,
            0,
            0,
            0,
            ALL_LOCAL_APICS,
            lint,
        ]);
    }
    let entry_count = u16::from(cpus) + 1 + 1 + (LAST_IRQ as u16 + 1) + 2;

    let table_addr = base + 16;
    let mut table: Vec<u8> = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.extend_from_slice(&[SPEC_REV, 0]); // checksum patched below
    table.extend_from_slice(b"COCOON  ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // no extended table
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating: Vec<u8> = Vec::with_capacity(16 + table.len());
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);
    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the table for `cpus` vCPUs at the start of the EBDA.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(cpus, EBDA_START)?;
    // `build` bounds cpus so the table always fits below the legacy hole.
    debug_assert!(EBDA_START + bytes.len() as u64 <= LEGACY_HOLE_START);
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_pointers_are_consistent() {
        for cpus in [1, 2, 16, MAX_CPUS] {
            let bytes = build(cpus, EBDA_START).unwrap();
            assert!(
                EBDA_START + bytes.len() as u64 <= LEGACY_HOLE_START,
                "{cpus} cpus overflow"
            );
            assert_eq!(&bytes[0..4], b"_MP_");
            assert_eq!(sum(&bytes[0..16]), 0);
            let table_addr = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
            assert_eq!(table_addr, EBDA_START + 16);
            let table = &bytes[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count as usize, cpus as usize + 2 + 24 + 2);
        }
    }

    #[test]
    fn only_the_first_cpu_is_the_boot_processor() {
        let bytes = build(3, EBDA_START).unwrap();
        let procs: Vec<&[u8]> = bytes[16 + 44..].chunks(20).take(3).collect();
        assert_eq!(procs[0][3], CPU_ENABLED | CPU_BOOTPROCESSOR);
        assert_eq!(procs[1][3], CPU_ENABLED);
        assert_eq!(procs[2][1], 2);
    }

    #[test]
    fn zero_or_too_many_cpus_are_refused() {
        assert!(build(0, EBDA_START).is_err());
        assert!(build(MAX_CPUS + 1, EBDA_START).is_err());
    }
}
