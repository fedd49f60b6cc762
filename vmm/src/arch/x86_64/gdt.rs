//! The flat global descriptor table a PVH guest starts with, and its segment registers.

use kvm_bindings::kvm_segment;

/// Code segment selector (GDT entry 1).
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector (GDT entry 2).
pub const DATA_SELECTOR: u16 = 0x10;
/// Task state segment selector (GDT entry 3).
pub const TSS_SELECTOR: u16 = 0x18;

/// Packs a segment descriptor from flags, base and limit (the x86 layout).
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The table written to guest memory: null, 32-bit flat code, flat data, a 32-bit busy TSS.
/// PVH requires 32-bit protected mode with flat segments; the kernel loads its own GDT at once.
pub const GDT: [u64; 4] = [
    0,
    descriptor(0xc09b, 0, 0xfffff),
    descriptor(0xc093, 0, 0xfffff),
    descriptor(0x008b, 0, 0x67),
];

/// The hidden part of a segment register as KVM wants it, decoded from a descriptor.
pub fn segment(descriptor: u64, selector: u16) -> kvm_segment {
    let flags = (descriptor >> 40) & 0xf0ff;
    let granular = (flags >> 15) & 1 == 1;
    let raw_limit = ((descriptor >> 32) & 0x000f_0000) | (descriptor & 0xffff);
    kvm_segment {
        base: ((descriptor >> 32) & 0xff00_0000) | ((descriptor >> 16) & 0x00ff_ffff),
        limit: if granular {
            ((raw_limit as u32) << 12) | 0xfff
        } else {
            raw_limit as u32
        },
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: granular as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_segment_decodes() {
        let cs = segment(GDT[1], CODE_SELECTOR);
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        assert_eq!(
            (cs.type_, cs.present, cs.dpl, cs.db, cs.s, cs.l, cs.g),
            (0xb, 1, 0, 1, 1, 0, 1)
        );
    }

    #[test]
    fn tss_is_byte_granular_and_busy() {
        let tr = segment(GDT[3], TSS_SELECTOR);
        assert_eq!((tr.limit, tr.type_, tr.s, tr.g), (0x67, 0xb, 0, 0));
    }

    #[test]
    fn descriptor_packs_base_and_limit() {
        let d = descriptor(0x0093, 0x1234_5678, 0xabcde);
        let s = segment(d, 0);
        assert_eq!((s.base, s.limit), (0x1234_5678, 0xabcde));
    }
}
