//! `cocoon check`: whether this host can run cocoon's microVMs, one line per item, the way
//! `kata-runtime check` does. `fail` items block running containers (and make the exit status
//! non-zero); `warn` items are worth knowing but block nothing.
//!
//! The kernel and initramfs are looked up exactly as `create` does (`Config::load`), so what
//! this reports is what the runtime would use.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Config;
use crate::error::CliError;

/// What `KVM_GET_API_VERSION` returns on every kernel KVM has been stable on.
const KVM_API_VERSION: i32 = 12;
const ELF_MAGIC: &[u8] = b"\x7fELF";
/// The initramfs must be an uncompressed newc cpio: the guest kernel has no decompressors.
const NEWC_MAGIC: &[u8] = b"070701";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    pub item: String,
    pub status: Status,
    pub detail: String,
}

fn item(name: &str, status: Status, detail: impl Into<String>) -> Item {
    Item {
        item: name.to_owned(),
        status,
        detail: detail.into(),
    }
}

/// Runs every check, prints them as text or (`json`) a JSON array, and fails when an item
/// does.
pub fn check(format: &str) -> Result<(), CliError> {
    let items = run_checks();
    match format {
        "json" => {
            let json = serde_json::to_string_pretty(&items)
                .map_err(|e| CliError::Other(format!("cannot encode the report: {e}")))?;
            println!("{json}");
        }
        "text" => {
            for i in &items {
                println!("{:<4}  {}: {}", i.status.label(), i.item, i.detail);
            }
        }
        other => {
            return Err(CliError::Other(format!(
                "invalid format {other:?}: use text or json"
            )));
        }
    }
    let failed: Vec<&str> = items
        .iter()
        .filter(|i| i.status == Status::Fail)
        .map(|i| i.item.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::Other(format!(
            "this host cannot run cocoon containers: {}",
            failed.join(", ")
        )))
    }
}

fn run_checks() -> Vec<Item> {
    let mut items = vec![kvm(), kvm_kind(&read_or_empty("/proc/cpuinfo"))];
    match Config::load() {
        Ok(config) => {
            items.push(boot_file(
                "kernel",
                &config.kernel,
                ELF_MAGIC,
                "an ELF vmlinux",
            ));
            items.push(boot_file(
                "initramfs",
                &config.initrd,
                NEWC_MAGIC,
                "an uncompressed newc cpio",
            ));
        }
        Err(e) => items.push(item("config", Status::Fail, e.to_string())),
    }
    for (name, what) in [
        ("/dev/vhost-vsock", "vsock"),
        ("/dev/vhost-net", "virtio-net"),
    ] {
        items.push(vhost(name, what));
    }
    items.push(tun());
    items.push(cgroups(Path::new("/sys/fs/cgroup")));
    items.push(match find_on_path("mkfs.erofs") {
        Some(path) => item("mkfs.erofs", Status::Ok, path.display().to_string()),
        None => item(
            "mkfs.erofs",
            Status::Fail,
            "not found: install erofs-utils (root filesystems become EROFS images for the VM)",
        ),
    });
    items.extend(engines());
    items
}

fn read_or_empty(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn kvm() -> Item {
    const NAME: &str = "/dev/kvm";
    if !Path::new(NAME).exists() {
        return item(
            NAME,
            Status::Fail,
            "missing: load kvm_intel, kvm_amd or kvm_pvm, or enable nested virtualisation",
        );
    }
    match kvm_ioctls::Kvm::new() {
        Ok(kvm) => match kvm.get_api_version() {
            KVM_API_VERSION => item(NAME, Status::Ok, "usable (KVM API version 12)"),
            v => item(
                NAME,
                Status::Fail,
                format!("KVM API version {v}, not {KVM_API_VERSION}"),
            ),
        },
        Err(e) => item(NAME, Status::Fail, format!("cannot open: {e}")),
    }
}

/// How guests run here, from `/sys/module/kvm_pvm` and the CPU flags in `cpuinfo`.
fn kvm_kind(cpuinfo: &str) -> Item {
    const NAME: &str = "KVM kind";
    if cocoon_vmm::host::is_pvm() {
        return item(
            NAME,
            Status::Ok,
            "PVM (kvm_pvm): guest kernel code runs in KVM's instruction emulator, so boots are \
             slow (~15 s) while container user code runs at full speed",
        );
    }
    let has_flag = |flag: &str| {
        cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == flag))
    };
    if has_flag("vmx") {
        item(NAME, Status::Ok, "Intel VT-x: hardware virtualisation")
    } else if has_flag("svm") {
        item(NAME, Status::Ok, "AMD-V (SVM): hardware virtualisation")
    } else {
        item(
            NAME,
            Status::Warn,
            "no vmx or svm CPU flag and no kvm_pvm module: KVM may be missing or unusual here",
        )
    }
}

/// Whether `path` is readable and starts with `magic`.
fn boot_file(name: &str, path: &Path, magic: &[u8], what: &str) -> Item {
    let mut head = vec![0u8; magic.len()];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head));
    match read {
        Ok(()) if head == magic => item(name, Status::Ok, path.display().to_string()),
        Ok(()) => item(
            name,
            Status::Fail,
            format!("{} is not {what}", path.display()),
        ),
        Err(e) => item(
            name,
            Status::Fail,
            format!(
                "cannot read {}: {e} (set kernel/initrd in /etc/cocoon/config.toml or install to \
                 ../lib/cocoon/ beside the binary)",
                path.display()
            ),
        ),
    }
}

fn vhost(name: &str, what: &str) -> Item {
    let presence = if Path::new(name).exists() {
        "present, not needed"
    } else {
        "absent, fine"
    };
    item(
        name,
        Status::Ok,
        format!("{presence}: cocoon emulates {what} in user space"),
    )
}

fn tun() -> Item {
    const NAME: &str = "/dev/net/tun";
    if Path::new(NAME).exists() {
        item(
            NAME,
            Status::Ok,
            "present (TAP devices for guest networking)",
        )
    } else {
        item(
            NAME,
            Status::Warn,
            "missing: guests cannot get a network device (modprobe tun)",
        )
    }
}

/// The host's cgroup layout. Containers' cgroups are the guest's own (v2), so any layout works
/// for cocoon; engines care (crun refuses hybrid hosts).
fn cgroups(root: &Path) -> Item {
    const NAME: &str = "cgroups";
    let layout = if root.join("cgroup.controllers").exists() {
        "v2 (unified)"
    } else if root.join("unified").is_dir() {
        "hybrid (v1 controllers, v2 at unified/)"
    } else if root.join("memory").is_dir() || root.join("cpu").is_dir() {
        "v1"
    } else {
        return item(
            NAME,
            Status::Warn,
            format!("no cgroup hierarchy found at {}", root.display()),
        );
    };
    item(
        NAME,
        Status::Ok,
        format!("{layout}; containers' cgroups are the guest's own v2"),
    )
}

/// `name` in the directories of `PATH`, then in the sbin directories (engines are often there,
/// and `sudo` may have left them off `PATH`).
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Podman's containers.conf files, lowest precedence first.
fn podman_configs() -> Vec<PathBuf> {
    let mut files = vec![
        PathBuf::from("/usr/share/containers/containers.conf"),
        PathBuf::from("/etc/containers/containers.conf"),
    ];
    if let Ok(dir) = std::fs::read_dir("/etc/containers/containers.conf.d") {
        let mut extra: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        extra.sort();
        files.extend(extra);
    }
    if let Some(home) = std::env::var_os("HOME") {
        files.push(Path::new(&home).join(".config/containers/containers.conf"));
    }
    if let Some(explicit) = std::env::var_os("CONTAINERS_CONF") {
        files.push(explicit.into());
    }
    files
}

fn engines() -> Vec<Item> {
    let mut items = Vec::new();
    if find_on_path("podman").is_some() {
        let found = podman_configs()
            .into_iter()
            .find(|f| podman_conf_has_cocoon(&std::fs::read_to_string(f).unwrap_or_default()));
        items.push(engine_item(
            "podman",
            found.as_deref(),
            "add cocoon under [engine.runtimes] in containers.conf (docs/podman.md)",
        ));
    }
    if find_on_path("containerd").is_some() {
        let config = Path::new("/etc/containerd/config.toml");
        let found =
            containerd_conf_has_cocoon(&std::fs::read_to_string(config).unwrap_or_default());
        items.push(engine_item(
            "containerd",
            found.then_some(config),
            "add a cocoon runtime to /etc/containerd/config.toml (docs/containerd.md)",
        ));
    }
    if find_on_path("dockerd").is_some() {
        let config = Path::new("/etc/docker/daemon.json");
        let found = docker_conf_has_cocoon(&std::fs::read_to_string(config).unwrap_or_default());
        items.push(engine_item(
            "docker",
            found.then_some(config),
            "add cocoon to \"runtimes\" in /etc/docker/daemon.json (docs/docker.md)",
        ));
    }
    items
}

fn engine_item(engine: &str, config: Option<&Path>, how: &str) -> Item {
    match config {
        Some(path) => item(
            engine,
            Status::Ok,
            format!("configured to use cocoon ({})", path.display()),
        ),
        None => item(
            engine,
            Status::Warn,
            format!("installed, not set up for cocoon: {how}"),
        ),
    }
}

/// Whether a containers.conf names cocoon in its `[engine.runtimes]` table.
fn podman_conf_has_cocoon(text: &str) -> bool {
    let mut in_runtimes = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_runtimes = line.trim_matches(|c| c == '[' || c == ']').trim() == "engine.runtimes";
        } else if in_runtimes && !line.starts_with('#') && line.contains("cocoon") {
            return true;
        }
    }
    false
}

/// Whether containerd's config mentions cocoon outside comments (a runtime named cocoon, or
/// runc's `BinaryName` pointing at it).
fn containerd_conf_has_cocoon(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .any(|l| !l.starts_with('#') && l.contains("cocoon"))
}

/// Whether daemon.json's `runtimes` has a runtime named cocoon or one whose path is cocoon.
fn docker_conf_has_cocoon(text: &str) -> bool {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(text) else {
        return false;
    };
    let Some(runtimes) = json.get("runtimes").and_then(|r| r.as_object()) else {
        return false;
    };
    runtimes.iter().any(|(name, runtime)| {
        name == "cocoon"
            || runtime
                .get("path")
                .and_then(|p| p.as_str())
                .is_some_and(|p| Path::new(p).file_name().is_some_and(|f| f == "cocoon"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cocoon-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn boot_files_are_recognised_by_their_magic() {
        let elf = temp("vmlinux", b"\x7fELF\x02\x01\x01rest");
        let cpio = temp("initramfs.cpio", b"070701000000");
        let gzip = temp("initramfs.gz", b"\x1f\x8b\x08\x00\x00\x00");
        let short = temp("short", b"\x7f");
        assert_eq!(boot_file("k", &elf, ELF_MAGIC, "ELF").status, Status::Ok);
        assert_eq!(boot_file("i", &cpio, NEWC_MAGIC, "cpio").status, Status::Ok);
        let bad = boot_file("i", &gzip, NEWC_MAGIC, "an uncompressed newc cpio");
        assert_eq!(bad.status, Status::Fail);
        assert!(
            bad.detail.contains("is not an uncompressed newc cpio"),
            "{}",
            bad.detail
        );
        assert_eq!(boot_file("k", &cpio, ELF_MAGIC, "ELF").status, Status::Fail);
        assert_eq!(
            boot_file("k", &short, ELF_MAGIC, "ELF").status,
            Status::Fail
        );
        let missing = boot_file("k", Path::new("/nonexistent/vmlinux"), ELF_MAGIC, "ELF");
        assert_eq!(missing.status, Status::Fail);
        assert!(missing.detail.contains("cannot read /nonexistent/vmlinux"));
        let _ = std::fs::remove_dir_all(elf.parent().unwrap());
    }

    #[test]
    fn cpu_flags_name_the_kvm_kind() {
        if cocoon_vmm::host::is_pvm() {
            // PVM wins over the flags; the rest cannot be seen on this host.
            assert!(kvm_kind("flags : fpu vmx").detail.starts_with("PVM"));
            return;
        }
        assert!(kvm_kind("flags\t: fpu vmx sse").detail.contains("VT-x"));
        assert!(kvm_kind("flags\t: fpu svm").detail.contains("SVM"));
        assert_eq!(kvm_kind("flags\t: fpu vmxe").status, Status::Warn);
    }

    #[test]
    fn podman_needs_cocoon_in_engine_runtimes() {
        assert!(podman_conf_has_cocoon(
            "[engine]\nruntime = \"cocoon\"\n[engine.runtimes]\ncocoon = [\"/usr/local/bin/cocoon\"]\n"
        ));
        assert!(podman_conf_has_cocoon(
            "[ engine.runtimes ]\nmine = [\"/opt/cocoon/bin/cocoon\"]\n"
        ));
        // Named elsewhere, or only in a comment: not a runtime Podman knows.
        assert!(!podman_conf_has_cocoon("[engine]\nruntime = \"cocoon\"\n"));
        assert!(!podman_conf_has_cocoon(
            "[engine.runtimes]\n# cocoon = [\"/usr/local/bin/cocoon\"]\n[containers]\nx = \"cocoon\"\n"
        ));
        assert!(!podman_conf_has_cocoon(""));
    }

    #[test]
    fn containerd_and_docker_configs() {
        assert!(containerd_conf_has_cocoon(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.cocoon]\n"
        ));
        assert!(!containerd_conf_has_cocoon("version = 2\n# cocoon later\n"));

        assert!(docker_conf_has_cocoon(
            r#"{"runtimes": {"cocoon": {"path": "/usr/local/bin/cocoon"}}}"#
        ));
        assert!(docker_conf_has_cocoon(
            r#"{"runtimes": {"vm": {"path": "/opt/bin/cocoon"}}, "default-runtime": "vm"}"#
        ));
        assert!(!docker_conf_has_cocoon(r#"{"default-runtime": "cocoon"}"#));
        assert!(!docker_conf_has_cocoon(
            r#"{"runtimes": {"kata": {"path": "/usr/bin/cocoon-not"}}}"#
        ));
        assert!(!docker_conf_has_cocoon("not json"));
    }

    #[test]
    fn cgroup_layouts() {
        let root = std::env::temp_dir().join(format!("cocoon-check-cg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("memory")).unwrap();
        assert!(cgroups(&root).detail.starts_with("v1"));
        std::fs::create_dir_all(root.join("unified")).unwrap();
        assert!(cgroups(&root).detail.starts_with("hybrid"));
        std::fs::write(root.join("cgroup.controllers"), "memory").unwrap();
        assert!(cgroups(&root).detail.starts_with("v2"));
        assert_eq!(cgroups(&root.join("none")).status, Status::Warn);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_report_serialises_as_tools_expect() {
        let json = serde_json::to_value(vec![item("x", Status::Warn, "d")]).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{"item": "x", "status": "warn", "detail": "d"}])
        );
    }
}
