//! cocoon-vmm as a user meets it when something is wrong: bad flags, missing files, no KVM, and
//! guests that crash at their first instruction (tiny hand-made ELF "kernels", so no boot).

use std::process::Command;

use cocoon_tests::{ONE_VM_AT_A_TIME, Scratch, artifacts_or_skip, pvh_elf, run, vmm_or_skip};

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_lists_every_flag() {
    let Some(vmm) = vmm_or_skip("help_lists_every_flag") else {
        return;
    };
    let out = run(&vmm, &["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--cpus",
        "--memory",
        "--disk",
        "--console",
        "--metrics",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
}

#[test]
fn bad_input_gets_one_clear_error() {
    let Some(vmm) = vmm_or_skip("bad_input_gets_one_clear_error") else {
        return;
    };
    let scratch = Scratch::new("cli");
    let kernel = scratch.path("vmlinux");
    std::fs::write(&kernel, pvh_elf(&[0xf4])).unwrap();
    let k = kernel.to_str().unwrap();

    let cases: [(&[&str], i32, &str); 7] = [
        (
            &["--kernel", "/nonexistent/vmlinux"],
            1,
            "kernel image /nonexistent/vmlinux does not exist",
        ),
        (
            &["--kernel", k, "--initrd", "/nonexistent/initrd"],
            1,
            "initramfs /nonexistent/initrd does not exist",
        ),
        (
            &["--kernel", k, "--memory", "4"],
            1,
            "--memory must be between 32 and",
        ),
        (
            &["--kernel", k, "--cpus", "64"],
            1,
            "--cpus must be between 1 and 32",
        ),
        (&["--kernel", k, "--cpus", "0"], 2, "--cpus"),
        (
            &["--kernel", k, "--disk", "/nonexistent/disk.img"],
            1,
            "cannot open disk image /nonexistent/disk.img",
        ),
        (
            &["--kernel", k, "--console", ""],
            2,
            "console must be stdout, off or a file path",
        ),
    ];
    for (args, code, message) in cases {
        let out = run(&vmm, args);
        let stderr = stderr_of(&out);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(
            stderr.contains(message),
            "{args:?}: want {message:?} in {stderr:?}"
        );
    }

    let not_elf = scratch.path("not-elf");
    std::fs::write(&not_elf, b"MZ this is not a vmlinux").unwrap();
    if std::path::Path::new("/dev/kvm").exists() {
        let out = run(&vmm, &["--kernel", not_elf.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr_of(&out).contains("needs an uncompressed ELF vmlinux"),
            "{}",
            stderr_of(&out)
        );
    }
}

#[test]
fn missing_kvm_is_reported() {
    let Some(vmm) = vmm_or_skip("missing_kvm_is_reported") else {
        return;
    };
    let scratch = Scratch::new("nokvm");
    let kernel = scratch.path("vmlinux");
    std::fs::write(&kernel, pvh_elf(&[0xf4])).unwrap();
    // Hide /dev/kvm in a private mount namespace (needs root; skipped otherwise).
    let script = format!(
        "mount -t tmpfs none /dev && exec {} --kernel {}",
        vmm.display(),
        kernel.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .output();
    let Some(out) = out
        .ok()
        .filter(|o| !String::from_utf8_lossy(&o.stderr).contains("unshare failed"))
    else {
        eprintln!("SKIPPED missing_kvm_is_reported: cannot make a mount namespace here");
        return;
    };
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot open /dev/kvm"), "{stderr}");
}

fn crash_at_entry(test: &str, code: &[u8]) -> Option<(i32, String)> {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let artifacts = artifacts_or_skip(test)?;
    let scratch = Scratch::new(test);
    let kernel = scratch.path("vmlinux");
    std::fs::write(&kernel, pvh_elf(code)).unwrap();
    let out = run(
        &artifacts.vmm,
        &["--kernel", kernel.to_str().unwrap(), "--console", "off"],
    );
    Some((out.status.code().unwrap_or(-1), stderr_of(&out)))
}

#[test]
fn guest_triple_fault_is_reported_with_its_rip() {
    // ud2 with no IDT: #UD, then #DF, then shutdown.
    let Some((code, stderr)) = crash_at_entry("triple_fault", &[0x0f, 0x0b]) else {
        return;
    };
    assert_eq!(code, 3, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("guest triple-faulted at guest rip 0x"),
        "{stderr}"
    );
}

#[test]
fn guest_instruction_kvm_cannot_run_is_reported() {
    // xgetbv: fatal in KVM's emulator on PVM hosts (internal error); elsewhere it faults with
    // XSAVE disabled, and with no IDT that is a triple fault. Either way: one line, exit 3.
    let Some((code, stderr)) = crash_at_entry("internal_error", &[0x31, 0xc9, 0x0f, 0x01, 0xd0])
    else {
        return;
    };
    assert_eq!(code, 3, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let want = if pvm {
        "KVM internal error 1 (emulation failure) at guest rip 0x100002"
    } else {
        "triple-faulted"
    };
    assert!(stderr.contains(want), "want {want:?}: {stderr}");
}

#[test]
fn sigterm_kills_the_guest_and_leaves_nothing_behind() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(artifacts) = artifacts_or_skip("sigterm") else {
        return;
    };
    let scratch = Scratch::new("sigterm");
    let uds = scratch.path("v.sock");
    let child = artifacts
        .vmm_command(&[])
        .args([
            "--console",
            "off",
            "--vsock",
            &format!("3,{}", uds.display()),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(uds.exists(), "the vsock socket is there while the VM runs");
    // SAFETY: kill(2) on the child we just spawned and have not waited for.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("stopped by signal 15"), "{stderr}");
    assert!(!uds.exists(), "vsock socket left behind");
}
