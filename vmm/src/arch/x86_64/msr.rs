//! Model-specific registers every vCPU starts with.

use kvm_bindings::{Msrs, kvm_msr_entry};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// The boot MSR values: syscall MSRs cleared (the kernel sets them) and fast strings on.
pub fn boot_msrs() -> Msrs {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ];
    // The list is far below KVM_MAX_MSR_ENTRIES, the only way from_entries fails.
    Msrs::from_entries(&entries).expect("boot MSR list fits in a kvm_msrs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misc_enable_has_fast_strings() {
        let msrs = boot_msrs();
        let misc = msrs
            .as_slice()
            .iter()
            .find(|e| e.index == MSR_IA32_MISC_ENABLE)
            .unwrap();
        assert_eq!(misc.data, MISC_ENABLE_FAST_STRING);
    }
}
