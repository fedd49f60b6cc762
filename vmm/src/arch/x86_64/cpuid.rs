//! The CPUID table each vCPU gets: what KVM supports, with this vCPU's topology filled in.
//!
//! On PVM hosts leaf 1 feature bits can be added but not removed and leaves 7/0xD ignore the
//! table, so features the guest kernel must not use are hidden on its command line instead
//! (see `cmdline::PVM_OPTIONS`). Here we describe the topology and the hypervisor, and on PVM
//! hosts withdraw the paravirtual features that need a hypercall the host does not serve.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXTENDED_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXTENDED_TOPOLOGY: u32 = 0x1f;
/// KVM's paravirtual feature leaf.
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
/// Features whose hypercall (`vmcall`) never completes on a PVM host: with PV IPIs on, the
/// first IPI an application processor sends hangs it, and SMP boot with it.
const PVM_MISSING_HYPERCALLS: u32 = KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units (64 bytes), leaf 1 EBX[15:8].
const CLFLUSH_LINE: u32 = 8;

/// Adjusts `cpuid` (KVM's supported table) for vCPU `id` of `count`.
pub fn configure(cpuid: &mut CpuId, id: u8, count: u8, pvm_host: bool) {
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
            LEAF_KVM_FEATURES if pvm_host => {
                entry.eax &= !PVM_MISSING_HYPERCALLS;
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
        configure(&mut cpuid, 3, 4, false);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ecx, 0x1 | ECX_HYPERVISOR);
        assert_eq!(e[1].edx, 3);

        let mut single = CpuId::from_entries(&entries).unwrap();
        configure(&mut single, 0, 1, false);
        assert_eq!(single.as_slice()[0].edx & EDX_HTT, 0);
    }

    #[test]
    fn pv_hypercall_features_are_withdrawn_on_pvm_hosts_only() {
        let all = u32::MAX;
        let entries = [kvm_cpuid_entry2 {
            function: LEAF_KVM_FEATURES,
            eax: all,
            ..Default::default()
        }];
        let mut pvm = CpuId::from_entries(&entries).unwrap();
        configure(&mut pvm, 0, 2, true);
        assert_eq!(pvm.as_slice()[0].eax, all & !PVM_MISSING_HYPERCALLS);
        let mut vtx = CpuId::from_entries(&entries).unwrap();
        configure(&mut vtx, 0, 2, false);
        assert_eq!(vtx.as_slice()[0].eax, all);
    }
}
