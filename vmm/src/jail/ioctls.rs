//! The ioctl requests the jailed threads may make, encoded as the kernel's `_IOC` macros do
//! (x86-64: direction in bits 30-31, size in 16-29, type in 8-15, number in 0-7).

use kvm_bindings::{
    kvm_cpuid2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

const WRITE: u64 = 1;
const READ: u64 = 2;
const KVMIO: u64 = 0xAE;

const fn ioc(dir: u64, kind: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (kind << 8) | nr
}

const fn kvm_read<T>(nr: u64) -> u64 {
    ioc(READ, KVMIO, nr, std::mem::size_of::<T>())
}

const fn kvm_read_write<T>(nr: u64) -> u64 {
    ioc(READ | WRITE, KVMIO, nr, std::mem::size_of::<T>())
}

pub const KVM_RUN: u64 = ioc(0, KVMIO, 0x80, 0);
pub const KVM_GET_TSC_KHZ: u64 = ioc(0, KVMIO, 0xa3, 0);

/// What a vCPU thread reads of its own vCPU while it is parked for a snapshot
/// (`vcpu/persist.rs`). The `KVM_SET_*` ones are not here: a restore sets state before the
/// threads start.
pub const VCPU_STATE_READS: [u64; 12] = [
    kvm_read::<kvm_regs>(0x81),
    kvm_read::<kvm_sregs>(0x83),
    kvm_read_write::<kvm_msrs>(0x88),
    kvm_read::<kvm_fpu>(0x8c),
    kvm_read::<kvm_lapic_state>(0x8e),
    kvm_read_write::<kvm_cpuid2>(0x91),
    kvm_read::<kvm_mp_state>(0x98),
    kvm_read::<kvm_vcpu_events>(0x9f),
    kvm_read::<kvm_debugregs>(0xa1),
    kvm_read::<kvm_xsave>(0xa4),
    kvm_read::<kvm_xcrs>(0xa6),
    // KVM_GET_XSAVE2, which kvm-ioctls uses where the host has a larger XSAVE area.
    kvm_read::<kvm_xsave>(0xcf),
];

/// Sets the offloads the guest negotiated on the TAP, when the driver activates the NIC (from
/// an MMIO write, so on a vCPU thread) or when a TAP is attached to an active NIC.
pub const TUNSETOFFLOAD: u64 = ioc(WRITE, b'T' as u64, 0xd0, std::mem::size_of::<u32>());

/// `set_nonblocking` on a socket the device accepted or connected.
pub const FIONBIO: u64 = 0x5421;
pub const FIONREAD: u64 = 0x541b;
