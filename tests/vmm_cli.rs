//! cocoon-vmm as a user meets it when something is wrong: bad flags, missing files, no KVM, and
//! guests that crash at their first instruction (tiny hand-made ELF "kernels", so no boot).

use std::process::Command;

use cocoon_tests::{
    ONE_VM_AT_A_TIME, Scratch, api_ask as ask, artifacts_or_skip, pvh_elf, run, vmm_or_skip,
};

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
        "--api-sock",
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

/// One request on the VMM's API socket, its reply parsed.
#[test]
fn api_socket_pauses_and_resumes_a_booting_guest() {
    use std::time::{Duration, Instant};
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(artifacts) = artifacts_or_skip("api_socket_pauses_and_resumes_a_booting_guest") else {
        return;
    };
    let scratch = Scratch::new("api");
    let api = scratch.path("api.sock");
    let console = scratch.path("console.log");
    let metrics = scratch.path("metrics.json");
    // The boot self-check with no disks: the agent comes up and powers off.
    let mut child = cocoon_tests::RunningVm {
        child: artifacts
            .vmm_command(&[])
            .args(["--console", console.to_str().unwrap()])
            .args(["--metrics", metrics.to_str().unwrap()])
            .args(["--api-sock", api.to_str().unwrap()])
            .args(["--cpus", "2", "--cmdline", "cocoon.check=1"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        if let Ok(stream) = std::os::unix::net::UnixStream::connect(&api) {
            break stream;
        }
        child.assert_running();
        assert!(
            Instant::now() < deadline,
            "no API socket at {}",
            api.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    // Jailed by default, with guest memory kept out of core dumps (128 MiB by default).
    cocoon_tests::assert_vmm_jailed(child.child.id(), 128);
    // Let the guest get going (its first exits), so the pause has running vCPUs to stop.
    let deadline = Instant::now() + Duration::from_secs(5);
    while ask(&mut stream, r#"{"action":"state"}"#)["exits"] == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }

    let paused = ask(&mut stream, r#"{"action":"pause"}"#);
    assert_eq!(paused, serde_json::json!({"ok": true, "state": "paused"}));
    let before = ask(&mut stream, r#"{"action":"state"}"#);
    assert_eq!(before["state"], "paused", "{before}");
    assert_eq!(
        before["vcpus"],
        serde_json::json!(["paused", "paused"]),
        "{before}"
    );
    let console_before = std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0);
    std::thread::sleep(Duration::from_secs(3));
    // Frozen: no exit, no console byte, no boot marker, still alive.
    child.assert_running();
    let after = ask(&mut stream, r#"{"action":"state"}"#);
    assert_eq!(after, before, "the guest ran while paused");
    assert_eq!(after["agent_up"], false, "{after}");
    assert_eq!(
        std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0),
        console_before,
        "console output while paused"
    );
    // Bad requests are answered, and the VM stays paused.
    let bad = ask(&mut stream, r#"{"action":"reboot"}"#);
    assert_eq!(bad["ok"], false, "{bad}");
    assert!(
        bad["error"].as_str().unwrap().contains("unknown action"),
        "{bad}"
    );
    assert_eq!(ask(&mut stream, "not json")["ok"], false);

    let resumed = ask(&mut stream, r#"{"action":"resume"}"#);
    assert_eq!(resumed, serde_json::json!({"ok": true, "state": "running"}));
    assert_eq!(
        ask(&mut stream, r#"{"action":"state"}"#)["state"],
        "running"
    );

    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not power off after resume"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(child.child.stderr.as_mut().unwrap(), &mut stderr);
    let console = std::fs::read_to_string(&console).unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(0),
        "stderr: {stderr}\nconsole:\n{console}"
    );
    assert!(console.contains("cocoon-agent: up, kernel "), "{console}");
    let metrics = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        metrics.contains("\"exit_reason\":\"powered_off\""),
        "{metrics}"
    );
    assert!(!metrics.contains("\"agent_up_us\":null"), "{metrics}");
    assert!(!api.exists(), "API socket left behind");
}
