//! A vCPU's state in a snapshot: everything KVM keeps for it, read and written on the vCPU's own
//! thread (KVM wants vCPU ioctls there), while the VM is paused.

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// `MSR_IA32_TSC_DEADLINE` is relative to the TSC: KVM must see the TSC first.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

#[derive(Serialize, Deserialize)]
pub struct VcpuSnapshot {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    /// Absent where KVM has no XCRs to give.
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM would save for this vCPU (its index list), kvm-clock's and the TSC among
    /// them.
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub tsc_khz: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuPersistError {
    #[error("vCPU {vcpu}: KVM refused to {what}: {source}")]
    Kvm {
        vcpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: KVM refused MSR {index:#x} of the snapshot")]
    Msr { vcpu: u8, index: u32 },
    #[error("vCPU {vcpu}: the snapshot's {what} is invalid")]
    Invalid { vcpu: u8, what: &'static str },
}

fn kvm(vcpu: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuPersistError {
    move |source| VcpuPersistError::Kvm { vcpu, what, source }
}

/// Reads the MSRs of `indices` that this vCPU has; KVM stops a batch at the first it cannot
/// read, which is left out and the rest read again.
fn read_msrs(
    fd: &VcpuFd,
    vcpu: u8,
    indices: &[u32],
) -> Result<Vec<kvm_msr_entry>, VcpuPersistError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&chunk).map_err(|_| VcpuPersistError::Invalid {
            vcpu,
            what: "MSR list",
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm(vcpu, "read MSRs"))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        // Skip the one KVM could not read.
        rest = rest.get(read + 1..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Saves the vCPU. First completes any I/O the last exit left pending inside KVM (an MMIO read
/// whose data we supplied is only finished by the next `KVM_RUN`): a run with immediate exit
/// finishes it and returns at once.
pub fn save(
    fd: &mut VcpuFd,
    vcpu: u8,
    msr_indices: &[u32],
) -> Result<VcpuSnapshot, VcpuPersistError> {
    fd.set_kvm_immediate_exit(1);
    let _ = fd.run();
    fd.set_kvm_immediate_exit(0);
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm(vcpu, "read CPUID"))?;
    Ok(VcpuSnapshot {
        id: vcpu,
        cpuid: cpuid.as_slice().to_vec(),
        mp_state: fd.get_mp_state().map_err(kvm(vcpu, "read the MP state"))?,
        regs: fd.get_regs().map_err(kvm(vcpu, "read registers"))?,
        sregs: fd
            .get_sregs()
            .map_err(kvm(vcpu, "read special registers"))?,
        xsave: fd.get_xsave().map_err(kvm(vcpu, "read XSAVE state"))?,
        xcrs: fd.get_xcrs().ok(),
        debugregs: fd
            .get_debug_regs()
            .map_err(kvm(vcpu, "read debug registers"))?,
        lapic: fd.get_lapic().map_err(kvm(vcpu, "read the LAPIC"))?,
        msrs: read_msrs(fd, vcpu, msr_indices)?,
        events: fd
            .get_vcpu_events()
            .map_err(kvm(vcpu, "read vCPU events"))?,
        tsc_khz: fd.get_tsc_khz().ok(),
    })
}

/// Writes a saved state into a fresh vCPU, in the order KVM needs: CPUID before anything that
/// depends on features, the LAPIC before MSRs (the TSC deadline timer lives in both), events
/// last.
pub fn restore(fd: &VcpuFd, s: &VcpuSnapshot) -> Result<(), VcpuPersistError> {
    let vcpu = s.id;
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| VcpuPersistError::Invalid {
        vcpu,
        what: "CPUID",
    })?;
    fd.set_cpuid2(&cpuid).map_err(kvm(vcpu, "set CPUID"))?;
    if let Some(khz) = s.tsc_khz
        && fd.get_tsc_khz().ok() != Some(khz)
    {
        fd.set_tsc_khz(khz)
            .map_err(kvm(vcpu, "set the TSC frequency"))?;
    }
    fd.set_mp_state(s.mp_state)
        .map_err(kvm(vcpu, "set the MP state"))?;
    fd.set_regs(&s.regs).map_err(kvm(vcpu, "set registers"))?;
    fd.set_sregs(&s.sregs)
        .map_err(kvm(vcpu, "set special registers"))?;
    // SAFETY: KVM_SET_XSAVE (the legacy ioctl) reads exactly size_of::<kvm_xsave>() bytes, all
    // of which `s.xsave` owns; KVM validates the contents itself.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm(vcpu, "set XSAVE state"))?;
    if let Some(xcrs) = &s.xcrs {
        fd.set_xcrs(xcrs).map_err(kvm(vcpu, "set XCRs"))?;
    }
    fd.set_debug_regs(&s.debugregs)
        .map_err(kvm(vcpu, "set debug registers"))?;
    fd.set_lapic(&s.lapic).map_err(kvm(vcpu, "set the LAPIC"))?;
    let mut msrs = s.msrs.clone();
    msrs.sort_by_key(|e| e.index == MSR_IA32_TSC_DEADLINE);
    for chunk in msrs.chunks(64) {
        let batch = Msrs::from_entries(chunk).map_err(|_| VcpuPersistError::Invalid {
            vcpu,
            what: "MSR list",
        })?;
        let written = fd.set_msrs(&batch).map_err(kvm(vcpu, "set MSRs"))?;
        if written < chunk.len() {
            return Err(VcpuPersistError::Msr {
                vcpu,
                index: chunk[written].index,
            });
        }
    }
    fd.set_vcpu_events(&s.events)
        .map_err(kvm(vcpu, "set vCPU events"))?;
    Ok(())
}
