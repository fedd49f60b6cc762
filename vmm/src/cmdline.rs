//! The guest kernel command line: what every cocoon guest needs, what this host needs, the
//! virtio-mmio devices, then the user's own additions (last, so they win where the kernel
//! lets a later option override an earlier one).

use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;

/// Always present. `reboot=k` makes a reboot a write of 0xFE to the i8042 (our "VM is done"),
/// `panic=-1` turns a panic into an immediate reboot, the rest skips work the guest does not need
/// (each kernel instruction is expensive on a PVM host).
pub const BASE: &str = "reboot=k panic=-1 pci=off nomodules tsc=reliable no_timer_check \
                        lpj=1000000 cryptomgr.notests random.trust_cpu=on quiet";

/// What an unmodified guest needs on a PVM host, where guest kernel code is emulated: features
/// the emulator cannot execute are hidden before the kernel patches its instructions (CPUID
/// cannot hide them there; see docs/architecture.md). `erms` and `fsrm` are hidden for speed:
/// with them the kernel copies and clears memory with `rep movsb`/`rep stosb`, which the
/// emulator runs one byte per step; without them it moves 8 bytes per step (measured: boot to
/// the agent 24.5 s -> 20.4 s, reading a 32 MiB disk in the guest 66 s -> 36 s).
///
/// `noxsave` leaves the guest kernel saving only x87 and SSE registers across context switches,
/// while guest user mode runs with the host's XCR0 (AVX, AVX-512: the host ignores the guest's
/// XSETBV): guest processes that use AVX overwrite each other's registers. The kernel passes
/// `GLIBC_TUNABLES` to init as an environment variable; the agent runs with it and hands it to
/// every container process, so glibc's string and memory functions stay on SSE.
pub const PVM_OPTIONS: &str = "noxsave clearcpuid=smap,smep,popcnt,fsgsbase,cx16,erms,fsrm \
    GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-FMA,-FMA4,-AVX512F,-AVX512CD,-AVX512BW,\
    -AVX512DQ,-AVX512VL,-AVX512ER,-AVX512PF";

/// A virtio-mmio device the kernel must be told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("kernel command line is {0} bytes, longer than the {max} the kernel accepts", max = CMDLINE_MAX_SIZE - 1)]
    TooLong(usize),
    #[error("kernel command line contains a NUL byte or a newline")]
    BadCharacter,
}

/// Builds the whole command line.
pub fn build(
    console: bool,
    pvm_host: bool,
    devices: &[MmioDevice],
    extra: Option<&str>,
) -> Result<String, CmdlineError> {
    let mut line = String::from(BASE);
    if console {
        line.push_str(" console=ttyS0");
    } else {
        // No UART at all: the 8250 driver then probes nothing.
        line.push_str(" 8250.nr_uarts=0");
    }
    if pvm_host {
        line.push(' ');
        line.push_str(PVM_OPTIONS);
    }
    for dev in devices {
        line.push_str(&format!(
            " virtio_mmio.device={}K@{:#x}:{}",
            dev.size / 1024,
            dev.base,
            dev.irq
        ));
    }
    if let Some(extra) = extra.map(str::trim).filter(|e| !e.is_empty()) {
        if extra.contains(['\0', '\n']) {
            return Err(CmdlineError::BadCharacter);
        }
        line.push(' ');
        line.push_str(extra);
    }
    // The kernel copies at most CMDLINE_MAX_SIZE bytes including the terminating NUL.
    if line.len() >= CMDLINE_MAX_SIZE {
        return Err(CmdlineError::TooLong(line.len()));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_announced_in_order() {
        let devs = [
            MmioDevice {
                base: 0xd000_1000,
                size: 0x1000,
                irq: 5,
            },
            MmioDevice {
                base: 0xd000_2000,
                size: 0x1000,
                irq: 6,
            },
        ];
        let line = build(false, false, &devs, None).unwrap();
        assert!(
            line.ends_with("virtio_mmio.device=4K@0xd0001000:5 virtio_mmio.device=4K@0xd0002000:6")
        );
    }

    #[test]
    fn console_and_pvm_options() {
        let on = build(true, true, &[], None).unwrap();
        assert!(on.contains(" console=ttyS0"));
        assert!(on.contains(PVM_OPTIONS));
        let off = build(false, false, &[], None).unwrap();
        assert!(!off.contains("console="));
        assert!(off.contains("8250.nr_uarts=0"));
        assert!(!off.contains("clearcpuid"));
        assert!(off.starts_with("reboot=k panic=-1"));
    }

    #[test]
    fn user_options_come_last() {
        let line = build(true, false, &[], Some("  loglevel=8 cocoon.x=1 ")).unwrap();
        assert!(line.ends_with(" loglevel=8 cocoon.x=1"));
    }

    #[test]
    fn bad_user_options_are_refused() {
        assert_eq!(
            build(true, false, &[], Some("a\nb")),
            Err(CmdlineError::BadCharacter)
        );
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            build(true, false, &[], Some(&long)),
            Err(CmdlineError::TooLong(_))
        ));
    }
}
