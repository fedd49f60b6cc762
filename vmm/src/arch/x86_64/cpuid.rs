//! The CPUID table each vCPU gets: what KVM supports, with this vCPU's topology filled in.
//!
//! On PVM hosts leaf 1 feature bits can be added but not removed and leaves 7/0xD ignore the
//! table, so features the guest kernel must not use are hidden on its command line instead
//! (see `cmdline::pvm_options`). Here we only describe the topology and the hypervisor.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXTENDED_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXTENDED_TOPOLOGY: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units (64 bytes), leaf 1 EBX[15:8].
const CLFLUSH_LINE: u32 = 8;

/// Adjusts `cpuid` (KVM's supported table) for vCPU `id` of `count`.
pub fn configure(cpuid: &mut CpuId, id: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (u32::from(id) << 24) | (u32::from(count) << 16) | (CLFLUSH_LINE << 8);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_EXTENDED_TOPOLOGY | LEAF_V2_EXTENDED_TOPOLOGY => {
                entry.edx = u32::from(id);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn topology_is_per_vcpu() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ecx: 0x1,
                edx: EDX_HTT,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        configure(&mut cpuid, 3, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ecx, 0x1 | ECX_HYPERVISOR);
        assert_eq!(e[1].edx, 3);

        let mut single = CpuId::from_entries(&entries).unwrap();
        configure(&mut single, 0, 1);
        assert_eq!(single.as_slice()[0].edx & EDX_HTT, 0);
    }
}
