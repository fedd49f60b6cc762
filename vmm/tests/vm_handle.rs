//! The VM handle on real KVM with tiny hand-made guests (a few instructions, no kernel boot, so
//! milliseconds per VM): built paused, vCPU commands while paused, pause and resume of spinning
//! vCPUs, a host stop, a guest-initiated end with a vCPU that never ran, and a safe drop.
//!
//! Skipped without /dev/kvm, except when CI=true, where that is a failure.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cocoon_vmm::config::{ConsoleConfig, VmConfig};
use cocoon_vmm::devices::registry::Devices;
use cocoon_vmm::lifecycle::ExitReason;
use cocoon_vmm::vcpu::VcpuState;
use cocoon_vmm::vm::{Vm, VmError, VmState};

use cocoon_tests::{TINY_GUEST_ENTRY as ENTRY, pvh_elf};

fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "{test}: /dev/kvm is missing, and CI=true requires this test to run"
    );
    eprintln!("SKIPPED {test}: /dev/kvm is missing");
    false
}

struct Kernel(PathBuf);

impl Kernel {
    fn new(name: &str, code: &[u8]) -> Kernel {
        let path =
            std::env::temp_dir().join(format!("cocoon-vm-handle-{name}-{}", std::process::id()));
        std::fs::write(&path, pvh_elf(code)).unwrap();
        Kernel(path)
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn build(kernel: &Kernel, cpus: u8) -> Vm {
    let config = VmConfig {
        kernel: kernel.0.clone(),
        initrd: None,
        cmdline: None,
        cpus,
        memory_mib: 64,
        disks: Vec::new(),
        rng: true,
        vsock: None,
        nets: Vec::new(),
        fs: None,
        console: ConsoleConfig::Off,
    };
    Vm::build(&config, Instant::now(), SystemTime::now()).expect("build the VM")
}

fn rips(vm: &Vm) -> Vec<u64> {
    vm.with_vcpus(|_, fd| fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX))
        .unwrap()
}

fn ids(devices: &Devices) -> Vec<&str> {
    devices.ids().collect()
}

#[test]
fn built_paused_then_paused_resumed_and_stopped() {
    if !kvm_or_skip("built_paused_then_paused_resumed_and_stopped") {
        return;
    }
    // jmp $: spins at the entry forever, never exiting to the VMM.
    let kernel = Kernel::new("spin", &[0xeb, 0xfe]);
    let vm = Arc::new(build(&kernel, 2));
    assert_eq!(vm.state(), VmState::Paused);
    assert_eq!(vm.vcpu_states(), [VcpuState::Paused; 2]);
    assert_eq!(ids(vm.devices()), ["rng0"]);
    assert!(vm.devices().get("rng0").is_some() && vm.devices().get("block0").is_none());
    // Not one instruction yet: the boot vCPU still sits on the entry point.
    assert_eq!(rips(&vm)[0], ENTRY);
    assert!(vm.lifecycle().first_run().is_none());
    assert!(vm.wait_timeout(Duration::from_millis(20)).is_none());

    for _ in 0..20 {
        vm.resume().unwrap();
        assert_eq!(vm.state(), VmState::Running);
        std::thread::sleep(Duration::from_millis(5));
        vm.pause().unwrap();
        vm.pause().unwrap();
        assert_eq!(vm.state(), VmState::Paused);
        // The boot vCPU is out of KVM_RUN, still on its one-instruction loop.
        assert_eq!(vm.vcpu_states()[0], VcpuState::Paused);
        assert_eq!(rips(&vm)[0], ENTRY);
    }
    assert!(vm.lifecycle().first_run().is_some());
    vm.resume().unwrap();
    assert!(matches!(vm.with_vcpus(|id, _| id), Err(VmError::NotPaused)));

    // Stopped while running: kicked out, threads joined.
    vm.stop();
    assert_eq!(vm.wait(), ExitReason::Stopped);
    assert_eq!(vm.try_wait(), Some(ExitReason::Stopped));
    assert_eq!(vm.state(), VmState::Ended(ExitReason::Stopped));
    assert_eq!(vm.vcpu_states(), [VcpuState::Exited; 2]);
    assert!(matches!(
        vm.resume(),
        Err(VmError::Ended(ExitReason::Stopped))
    ));
    assert!(matches!(vm.pause(), Err(VmError::Ended(_))));
    drop(vm);
}

#[test]
fn a_guest_reset_ends_the_vm_and_stops_the_other_vcpus() {
    if !kvm_or_skip("a_guest_reset_ends_the_vm_and_stops_the_other_vcpus") {
        return;
    }
    // mov al, 0xfe; out 0x64, al: the i8042 reset line, with no shutdown notice. The second
    // vCPU never gets a SIPI and waits inside KVM_RUN: it must be kicked out.
    let kernel = Kernel::new("reset", &[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]);
    let vm = build(&kernel, 2);
    vm.resume().unwrap();
    let reason = vm
        .wait_timeout(Duration::from_secs(10))
        .expect("the guest reset");
    assert_eq!(reason, ExitReason::UnexpectedReset);
    assert_eq!(vm.vcpu_states(), [VcpuState::Exited; 2]);
    // A stop after the end changes nothing.
    vm.stop();
    assert_eq!(vm.wait(), ExitReason::UnexpectedReset);
}

#[test]
fn dropping_a_vm_that_never_ran_is_safe() {
    if !kvm_or_skip("dropping_a_vm_that_never_ran_is_safe") {
        return;
    }
    let kernel = Kernel::new("never", &[0xeb, 0xfe]);
    let vm = build(&kernel, 1);
    drop(vm);
    // And one dropped while running, without a stop first.
    let vm = build(&kernel, 1);
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(5));
    drop(vm);
}
