//! vCPU register state at PVH entry: 32-bit protected mode, flat segments, paging off, `ebx`
//! pointing at the start info; and the local APIC's LINT pins wired for ExtINT and NMI.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{CODE_SELECTOR, DATA_SELECTOR, GDT, TSS_SELECTOR, segment};
use super::layout::GDT_START;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const RFLAGS_RESERVED: u64 = 0x2;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// General registers at entry.
pub fn entry_regs(entry: u64, start_info: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rbx: start_info,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    }
}

/// Special registers at entry, starting from the vCPU's current ones.
pub fn entry_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(GDT[1], CODE_SELECTOR);
    let data = segment(GDT[2], DATA_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT[3], TSS_SELECTOR);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// The x87/SSE control words a freshly reset CPU has.
pub fn entry_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Writes the GDT the entry segments came from, so a reload by the guest finds the same thing.
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + (i * 8) as u64))?;
    }
    Ok(())
}

/// Sets LINT0 to ExtINT (the legacy PIC) and LINT1 to NMI, as firmware would.
pub fn wire_lint_pins(lapic: &mut kvm_lapic_state) {
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let value = read_lapic_reg(lapic, reg);
        write_lapic_reg(lapic, reg, (value & !0x700) | (mode << 8));
    }
}

fn read_lapic_reg(lapic: &kvm_lapic_state, reg: usize) -> u32 {
    let b = &lapic.regs[reg..reg + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn write_lapic_reg(lapic: &mut kvm_lapic_state, reg: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[reg + i] = *byte as i8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_state_is_32bit_protected_mode() {
        let sregs = entry_sregs(kvm_sregs::default());
        assert_eq!(sregs.cr0 & X86_CR0_PE, X86_CR0_PE);
        assert_eq!(sregs.cr0 & (1 << 31), 0, "paging must be off at PVH entry");
        assert_eq!(sregs.efer, 0);
        assert_eq!(sregs.cs.db, 1);
        assert_eq!(sregs.cs.l, 0);
        assert_eq!(sregs.gdt.limit, 31);
        let regs = entry_regs(0x100_0000, 0x6000);
        assert_eq!((regs.rip, regs.rbx, regs.rflags), (0x100_0000, 0x6000, 2));
    }

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        write_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0700);
        wire_lint_pins(&mut lapic);
        assert_eq!(read_lapic_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(read_lapic_reg(&lapic, APIC_LVT1), 0x400);
    }
}
