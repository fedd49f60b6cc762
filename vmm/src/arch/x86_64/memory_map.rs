//! Guest RAM regions and the e820 memory map the guest kernel is given.

use super::layout::{EBDA_START, HIGH_MEMORY_START, MMIO_GAP_END, MMIO_GAP_START};

/// e820 entry type for usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 entry type for reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One entry of the e820 map: `[addr, addr + size)` of `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest RAM regions for `mem_size` bytes: RAM up to the MMIO gap, the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    let low = mem_size.min(MMIO_GAP_START);
    let mut regions = vec![(0, low)];
    if mem_size > MMIO_GAP_START {
        regions.push((MMIO_GAP_END, mem_size - MMIO_GAP_START));
    }
    regions
}

/// The e820 map for `mem_size` bytes of RAM laid out by [`ram_regions`]. The last KiB of
/// conventional memory (the MP table) and the legacy hole up to 1 MiB are reserved.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIGH_MEMORY_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, size) in ram_regions(mem_size) {
        let end = start + size;
        let start = start.max(HIGH_MEMORY_START);
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_guest_has_one_region_and_three_entries() {
        assert_eq!(ram_regions(128 * MIB), vec![(0, 128 * MIB)]);
        let map = e820_map(128 * MIB);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9_fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9_fc00,
                    size: 0x6_0400,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: MIB,
                    size: 127 * MIB,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let regions = ram_regions(4 * GIB);
        assert_eq!(
            regions,
            vec![(0, MMIO_GAP_START), (4 * GIB, 4 * GIB - MMIO_GAP_START)]
        );
        let map = e820_map(4 * GIB);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            E820Entry {
                addr: MIB,
                size: MMIO_GAP_START - MIB,
                kind: E820_RAM
            }
        );
        assert_eq!(
            map[3],
            E820Entry {
                addr: 4 * GIB,
                size: 4 * GIB - MMIO_GAP_START,
                kind: E820_RAM
            }
        );
        // No RAM entry overlaps the gap and the total RAM is what was asked for (minus the
        // reserved legacy hole).
        for e in map.iter().filter(|e| e.kind == E820_RAM) {
            assert!(e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END);
        }
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, 4 * GIB - (MIB - 0x9_fc00));
    }

    #[test]
    fn entries_are_sorted_and_disjoint() {
        for size in [
            32 * MIB,
            3 * GIB,
            MMIO_GAP_START,
            MMIO_GAP_START + MIB,
            16 * GIB,
        ] {
            let map = e820_map(size);
            for pair in map.windows(2) {
                assert!(
                    pair[0].addr + pair[0].size <= pair[1].addr,
                    "{size}: {pair:?}"
                );
            }
        }
    }
}
