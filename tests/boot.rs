//! Boots the real guest kernel with the real agent under cocoon-vmm, as a user would, and
//! checks what the guest saw and did. Two boots in all: one healthy guest that runs every check,
//! one that panics on purpose.

use cocoon_agent_protocol::boot_check::{Fnv1a64, HWRNG_SAMPLE, disk_line, pattern};
use cocoon_tests::{ONE_VM_AT_A_TIME, Scratch, artifacts_or_skip, pseudo_random_bytes};

fn checksum(bytes: &[u8]) -> u64 {
    let mut h = Fnv1a64::default();
    h.update(bytes);
    h.finish()
}

#[test]
fn guest_boots_reads_and_writes_disks_and_powers_off() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(artifacts) = artifacts_or_skip("guest_boots_reads_and_writes_disks_and_powers_off")
    else {
        return;
    };
    let scratch = Scratch::new("boot");
    // Not a power of two, not sector-sized patterns: a misplaced sector changes the checksum.
    let ro_content = pseudo_random_bytes((1 << 20) + 4096, 0x5eed);
    let ro = scratch.path("ro.img");
    std::fs::write(&ro, &ro_content).unwrap();
    let rw = scratch.path("rw.img");
    std::fs::write(&rw, vec![0u8; 1 << 20]).unwrap();
    let console = scratch.path("console.log");
    let metrics = scratch.path("metrics.json");
    const WRITTEN: usize = 64 * 1024 + 512;

    let out = artifacts.run_vmm(&[
        "--disk",
        &format!("{},ro", ro.display()),
        "--disk",
        rw.to_str().unwrap(),
        "--console",
        console.to_str().unwrap(),
        "--metrics",
        metrics.to_str().unwrap(),
        "--cpus",
        "2",
        "--memory",
        "256",
        "--rng",
        "--cmdline",
        &format!("cocoon.check=1 cocoon.write=vdb:{WRITTEN}"),
    ]);
    let console = std::fs::read_to_string(&console).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "VMM exited with {:?}\nstderr: {stderr}\nconsole:\n{console}",
        out.status
    );

    // The agent came up as PID 1 on our kernel, and the guest has the vCPUs (the MP table) and
    // the memory (the e820 map) it was given.
    let up = console
        .lines()
        .find_map(|l| l.strip_prefix("cocoon-agent: up, kernel "))
        .unwrap_or_else(|| panic!("no agent line on the console:\n{console}"));
    let fields: Vec<&str> = up.split(", ").collect();
    assert!(
        fields[0].starts_with("6.1."),
        "unexpected kernel release in {up:?}"
    );
    assert_eq!(fields.get(1), Some(&"2 cpus"), "{up:?}");
    let mib: u64 = fields
        .get(2)
        .and_then(|f| f.strip_suffix(" MiB"))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        (200..=256).contains(&mib),
        "MemTotal {mib} MiB for a 256 MiB guest"
    );

    // Where user space can use registers the guest kernel does not save across context
    // switches (PVM hosts: `noxsave`, and the host's XCR0 with AVX-512 in user mode), glibc is
    // kept off AVX, or processes overwrite each other's AVX registers.
    let xstate = console
        .lines()
        .find_map(|l| l.strip_prefix("cocoon-agent: user xcr0 "))
        .unwrap_or_else(|| panic!("no extended-state line on the console:\n{console}"));
    let fields: Vec<&str> = xstate.split(", ").collect();
    let wide =
        u64::from_str_radix(fields[0].trim_start_matches("0x"), 16).is_ok_and(|x| x & !0x3 != 0);
    if wide && fields.get(1) == Some(&"kernel xsave no") {
        assert_eq!(fields.get(2), Some(&"glibc avx off"), "{xstate}");
    }

    // The read-only disk reads back byte-exact.
    let expected_ro = disk_line("vda", ro_content.len() as u64, checksum(&ro_content));
    assert!(
        console.contains(&expected_ro),
        "want {expected_ro:?} in:\n{console}"
    );

    // The guest's write reached the host file, and nothing else changed.
    let rw_after = std::fs::read(&rw).unwrap();
    assert_eq!(rw_after.len(), 1 << 20);
    assert!(
        rw_after[..WRITTEN] == pattern(WRITTEN)[..],
        "written bytes differ on the host"
    );
    assert!(
        rw_after[WRITTEN..].iter().all(|b| *b == 0),
        "bytes past the write changed"
    );
    let expected_rw = disk_line("vdb", rw_after.len() as u64, checksum(&rw_after));
    assert!(
        console.contains(&expected_rw),
        "want {expected_rw:?} in:\n{console}"
    );

    // The entropy device hands out random bytes (64 zero bytes in a row: odds 2^-512).
    let hwrng = console
        .lines()
        .find(|l| l.starts_with("cocoon-agent: hwrng"))
        .unwrap_or_else(|| panic!("no /dev/hwrng line:\n{console}"));
    assert!(
        hwrng.starts_with(&format!(
            "cocoon-agent: hwrng bytes={HWRNG_SAMPLE} nonzero="
        )),
        "{hwrng}"
    );
    assert!(!hwrng.ends_with("nonzero=0"), "{hwrng}");

    // The VMM timed the boot itself from the agent's marker, and powered off cleanly.
    let metrics = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        metrics.contains("\"exit_reason\":\"powered_off\""),
        "{metrics}"
    );
    assert!(
        !metrics.contains("\"agent_up_us\":null"),
        "no boot marker seen: {metrics}"
    );
}

#[test]
fn guest_kernel_panic_makes_the_vmm_fail() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(artifacts) = artifacts_or_skip("guest_kernel_panic_makes_the_vmm_fail") else {
        return;
    };
    // PID 1 exits, so the kernel panics; `panic=-1` resets without the agent's shutdown notice.
    let out = artifacts.run_vmm(&["--console", "off", "--cmdline", "cocoon.panic=1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one clear line, got: {stderr}");
    assert!(lines[0].contains("kernel panic"), "{stderr}");
}
