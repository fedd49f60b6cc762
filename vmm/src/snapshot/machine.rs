//! The VM-wide state KVM keeps outside the vCPUs: the in-kernel interrupt controllers (both
//! PICs and the IOAPIC), the PIT, and the kvm-clock.

use kvm_bindings::{
    KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    kvm_clock_data, kvm_irqchip, kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
pub struct MachineSnapshot {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

#[derive(Debug, thiserror::Error)]
#[error("KVM refused to {what}: {source}")]
pub struct MachineError {
    what: &'static str,
    source: kvm_ioctls::Error,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
    move |source| MachineError { what, source }
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, MachineError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(kvm("read an interrupt controller"))?;
    Ok(chip)
}

pub fn save(vm: &VmFd) -> Result<MachineSnapshot, MachineError> {
    let mut clock = vm.get_clock().map_err(kvm("read the kvm-clock"))?;
    // Only a flag KVM reports; setting a clock with it is refused.
    clock.flags &= !KVM_CLOCK_TSC_STABLE;
    Ok(MachineSnapshot {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm("read the PIT"))?,
        clock,
    })
}

/// Into a VM whose irqchip and PIT exist already. A crafted chip id is KVM's to refuse: each
/// is forced to the controller it is saved as.
pub fn restore(vm: &VmFd, s: &MachineSnapshot) -> Result<(), MachineError> {
    vm.set_pit2(&s.pit).map_err(kvm("set the PIT"))?;
    vm.set_clock(&s.clock).map_err(kvm("set the kvm-clock"))?;
    for (chip, id) in [
        (&s.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&s.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        let mut chip = *chip;
        chip.chip_id = id;
        vm.set_irqchip(&chip)
            .map_err(kvm("set an interrupt controller"))?;
    }
    Ok(())
}
