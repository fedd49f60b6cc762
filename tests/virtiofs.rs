//! virtio-fs against the real guest kernel's driver: a host directory shared read-write and
//! read-only with a guest whose init is a busybox script, which mounts it, works in it and
//! tries to get out of it. One boot.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cocoon_tests::{ONE_VM_AT_A_TIME, Scratch, artifacts_or_skip, from_env, paths_present_or_skip};

/// The guest's /init. Each check prints `CHECK name rc`; the last step writes a file with
/// `fsync` and waits to be killed.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t devtmpfs dev /dev
check() { name=$1; shift; "$@"; echo "CHECK $name $?"; }
check mount mount -t virtiofs cocoon /mnt
echo "LIST $(ls /mnt | tr '\n' ' ')"
echo "HOSTFILE $(cat /mnt/vol/from-host)"
check write sh -c 'printf "written by the guest\n" > /mnt/vol/from-guest'
check many sh -c 'mkdir /mnt/vol/many && i=0 && while [ $i -lt 200 ]; do echo $i > /mnt/vol/many/f$i; i=$((i+1)); done'
echo "COUNT $(ls /mnt/vol/many | wc -l)"
check big dd if=/mnt/vol/pattern of=/mnt/vol/copy bs=64k
echo "GUESTSUM $(md5sum /mnt/vol/pattern | cut -d' ' -f1)"
check rename mv /mnt/vol/from-guest /mnt/vol/renamed
check unlink rm /mnt/vol/many/f0
check setuid chmod 4755 /mnt/vol/renamed
check rel-link cat /mnt/vol/rel
check abs-link cat /mnt/vol/abs
check dotdot cat /mnt/vol/../../outside/secret
echo "ABOVE $(ls /mnt/.. | tr '\n' ' ')"
check device mknod /mnt/vol/null c 1 3
check fifo mknod /mnt/vol/fifo p
check ro-write sh -c 'echo x > /mnt/ro/nope'
check ro-unlink rm /mnt/ro/from-host
check open-dir sh -c 'mkdir /mnt/vol/open && chmod 777 /mnt/vol/open'
check user-write su -s /bin/sh guest -c 'echo mine > /mnt/vol/open/by-user'
check user-denied su -s /bin/sh guest -c 'echo x >> /mnt/vol/from-host'
check durable dd if=/mnt/vol/from-host of=/mnt/vol/durable conv=fsync
echo READY-TO-KILL
sleep 1000
"#;

fn cpio(stage: &Path, out: &Path) {
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --owner 0:0 > '{}'",
            stage.display(),
            out.display()
        ))
        .status()
        .expect("run cpio");
    assert!(status.success(), "cpio failed");
}

/// The value of the first console line `KEY rest`, if any.
fn value<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    console
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .map(str::trim)
}

#[test]
fn a_shared_directory_is_live_both_ways_and_confined() {
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(artifacts) = artifacts_or_skip("a_shared_directory_is_live_both_ways_and_confined")
    else {
        return;
    };
    let busybox = from_env("COCOON_BUSYBOX_DIR", "build/busybox-rootfs").join("bin/busybox");
    if !paths_present_or_skip("virtiofs", &[&busybox], "rootfs") {
        return;
    }
    let scratch = Scratch::new("virtiofs");
    let stage = scratch.path("stage");
    for dir in ["bin", "dev", "proc", "mnt", "etc"] {
        std::fs::create_dir_all(stage.join(dir)).unwrap();
    }
    std::fs::copy(&busybox, stage.join("bin/busybox")).unwrap();
    // The kernel opens init's stdio on it before devtmpfs is mounted.
    let console_node = stage.join("dev/console");
    let status = Command::new("mknod")
        .args(["-m", "0600"])
        .arg(&console_node)
        .args(["c", "5", "1"])
        .status()
        .unwrap();
    assert!(status.success(), "mknod (the tests run as root)");
    std::fs::write(stage.join("init"), INIT).unwrap();
    // A non-root user in the guest, as a container's `USER`.
    std::fs::write(
        stage.join("etc/passwd"),
        "root:x:0:0::/:/bin/sh\nguest:x:1000:1000::/:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(stage.join("etc/group"), "root:x:0:\nguest:x:1000:\n").unwrap();
    std::fs::set_permissions(stage.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let initrd = scratch.path("initrd.cpio");
    cpio(&stage, &initrd);

    let vol = scratch.path("vol");
    let outside = scratch.path("outside");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(vol.join("from-host"), "made on the host\n").unwrap();
    std::fs::write(outside.join("secret"), "host secret\n").unwrap();
    std::os::unix::fs::symlink("../outside/secret", vol.join("rel")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), vol.join("abs")).unwrap();
    // Not a multiple of the guest's page or of the 64 KiB copies.
    let pattern = cocoon_tests::pseudo_random_bytes((3 << 20) + 12_345, 0xf5);
    std::fs::write(vol.join("pattern"), &pattern).unwrap();

    let console_path = scratch.path("console.log");
    let mut vmm = Command::new(&artifacts.vmm)
        .arg("--kernel")
        .arg(&artifacts.kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--memory", "256", "--cmdline", "quiet", "--fs", "cocoon"])
        .arg("--share")
        .arg(format!("vol={}", vol.display()))
        .arg("--share")
        .arg(format!("ro={},ro", vol.display()))
        .arg("--console")
        .arg(&console_path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cocoon-vmm");
    let deadline = Instant::now() + Duration::from_secs(600);
    let console = loop {
        let console = std::fs::read_to_string(&console_path).unwrap_or_default();
        if console.contains("READY-TO-KILL") {
            break console;
        }
        if let Some(status) = vmm.try_wait().unwrap() {
            let mut stderr = String::new();
            vmm.stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            panic!("the VMM ended early ({status}): {stderr}\nconsole:\n{console}");
        }
        if Instant::now() > deadline {
            let _ = vmm.kill();
            panic!("the guest did not finish its checks; console:\n{console}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // What the guest fsynced is on the host even when the VMM is killed outright.
    vmm.kill().unwrap();
    vmm.wait().unwrap();
    assert_eq!(
        std::fs::read_to_string(vol.join("durable")).unwrap(),
        "made on the host\n"
    );

    let check = |name: &str| {
        value(&console, &format!("CHECK {name}"))
            .unwrap_or_else(|| panic!("no check {name} in the console:\n{console}"))
            .to_owned()
    };
    for ok in [
        "mount",
        "write",
        "many",
        "big",
        "rename",
        "unlink",
        "setuid",
        "fifo",
        "durable",
        "open-dir",
        "user-write",
    ] {
        assert_eq!(check(ok), "0", "{ok} failed; console:\n{console}");
    }
    // The guest saw the host's file and the shares by name.
    assert_eq!(value(&console, "LIST"), Some("ro vol"));
    assert_eq!(value(&console, "HOSTFILE"), Some("made on the host"));
    // Guest writes are on the host, byte-exact.
    assert_eq!(
        std::fs::read_to_string(vol.join("renamed")).unwrap(),
        "written by the guest\n"
    );
    assert!(!vol.join("from-guest").exists());
    assert_eq!(value(&console, "COUNT"), Some("200"));
    let many = std::fs::read_dir(vol.join("many")).unwrap().count();
    assert_eq!(many, 199, "200 files made, one removed");
    assert_eq!(
        std::fs::read_to_string(vol.join("many/f199")).unwrap(),
        "199\n"
    );
    assert_eq!(std::fs::read(vol.join("copy")).unwrap(), pattern);
    let host_sum = Command::new("md5sum")
        .arg(vol.join("pattern"))
        .output()
        .unwrap();
    let host_sum = String::from_utf8_lossy(&host_sum.stdout);
    assert_eq!(
        value(&console, "GUESTSUM"),
        host_sum.split_whitespace().next()
    );
    // A file a non-root guest user makes is that user's on the host; a root-owned file it
    // may not write stays as it was (the guest kernel checks permissions on our attributes).
    use std::os::unix::fs::MetadataExt;
    let by_user = std::fs::metadata(vol.join("open/by-user")).unwrap();
    assert_eq!((by_user.uid(), by_user.gid()), (1000, 1000));
    assert_eq!(
        std::fs::read_to_string(vol.join("open/by-user")).unwrap(),
        "mine\n"
    );
    assert_ne!(check("user-denied"), "0", "console:\n{console}");
    assert_eq!(
        std::fs::read_to_string(vol.join("from-host")).unwrap(),
        "made on the host\n"
    );
    // No set-user-ID bit reaches the host.
    let mode = std::fs::metadata(vol.join("renamed"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);

    // Links out of the share resolve in the guest, where there is nothing; `..` stays in the
    // guest; no device node is made; the read-only share refuses writes.
    for escape in [
        "rel-link",
        "abs-link",
        "dotdot",
        "device",
        "ro-write",
        "ro-unlink",
    ] {
        assert_ne!(
            check(escape),
            "0",
            "{escape} succeeded; console:\n{console}"
        );
    }
    let above = value(&console, "ABOVE").unwrap_or_default();
    assert!(
        above.contains("init") && !above.contains("outside"),
        "the mount's parent is the guest's root: {above}"
    );
    assert!(!vol.join("null").exists());
    assert!(console.contains("Read-only file system"), "{console}");
    assert!(vol.join("from-host").exists());
    assert_eq!(
        std::fs::read_to_string(outside.join("secret")).unwrap(),
        "host secret\n"
    );
}
