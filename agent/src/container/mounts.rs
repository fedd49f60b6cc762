//! Inside the new mount namespace: the OCI mounts, default devices and console under the
//! container's root, `pivot_root` into it, then masked and read-only paths and a read-only root.
//!
//! Mount targets come from an image the user chose: they are resolved inside the root, so a
//! symlink such as `/proc -> /` in the image cannot put a mount outside it.

use std::path::{Component, Path, PathBuf};

use cocoon_agent_protocol::spec::is_bind;
use oci_spec::runtime::{LinuxDeviceType, Mount, Spec};

use super::syscall::{Errno, FileKind, Syscall};

#[derive(Debug, thiserror::Error)]
#[error("{what}: {errno}")]
pub struct MountError {
    pub what: String,
    pub errno: Errno,
}

trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, MountError>;
}

impl<T> Context<T> for Result<T, Errno> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, MountError> {
        self.map_err(|errno| MountError {
            what: what(),
            errno,
        })
    }
}

/// A symlink chain longer than this is a loop (the kernel's own limit).
const MAX_SYMLINKS: usize = 40;

/// `path` (absolute, as the container sees it) resolved inside `root`: symlinks are followed as
/// if `root` were `/`, and `..` stops at `root`. Components that do not exist are kept as they
/// are. The result never leaves `root`.
pub fn resolve_in_root(sys: &dyn Syscall, root: &Path, path: &Path) -> Result<PathBuf, Errno> {
    let mut resolved = PathBuf::new();
    let mut pending: Vec<PathBuf> = path
        .components()
        .rev()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        match Path::new(&part).components().next() {
            None | Some(Component::RootDir | Component::CurDir | Component::Prefix(_)) => {}
            Some(Component::ParentDir) => {
                resolved.pop();
            }
            Some(Component::Normal(name)) => {
                let candidate = resolved.join(name);
                if sys.file_kind(&root.join(&candidate))? == Some(FileKind::Symlink) {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(Errno(libc::ELOOP));
                    }
                    let target = sys.read_link(&root.join(&candidate))?;
                    if target.is_absolute() {
                        resolved = PathBuf::new();
                    }
                    pending.extend(
                        target
                            .components()
                            .rev()
                            .map(|c| PathBuf::from(c.as_os_str())),
                    );
                } else {
                    resolved = candidate;
                }
            }
        }
    }
    Ok(root.join(resolved))
}

/// Creates the missing directories of `path` below `root` (which exists).
fn create_dirs(sys: &dyn Syscall, root: &Path, path: &Path) -> Result<(), Errno> {
    let relative = path.strip_prefix(root).map_err(|_| Errno(libc::EINVAL))?;
    let mut current = root.to_owned();
    for component in relative.components() {
        current.push(component);
        if sys.file_kind(&current)?.is_none() {
            sys.mkdir(&current, 0o755)?;
        }
    }
    Ok(())
}

/// Makes `target` exist as a directory, or as a file when `file` (bind mounts of files).
fn create_mount_point(
    sys: &dyn Syscall,
    root: &Path,
    target: &Path,
    file: bool,
) -> Result<(), Errno> {
    if file {
        if let Some(parent) = target.parent() {
            create_dirs(sys, root, parent)?;
        }
        if sys.file_kind(target)?.is_none() {
            sys.create_file(target)?;
        }
        Ok(())
    } else {
        create_dirs(sys, root, target)
    }
}

/// An OCI mount's `options` split into what mount(2) takes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: libc::c_ulong,
    /// Propagation changes, applied with separate calls after the mount.
    pub propagation: Vec<libc::c_ulong>,
    /// Filesystem-specific options, comma-joined into mount(2)'s data.
    pub data: Vec<String>,
}

impl MountOptions {
    pub fn parse(options: &[String]) -> MountOptions {
        let mut parsed = MountOptions::default();
        for option in options {
            let (set, clear): (libc::c_ulong, libc::c_ulong) = match option.as_str() {
                "ro" => (libc::MS_RDONLY, 0),
                "rw" => (0, libc::MS_RDONLY),
                "nosuid" => (libc::MS_NOSUID, 0),
                "suid" => (0, libc::MS_NOSUID),
                "nodev" => (libc::MS_NODEV, 0),
                "dev" => (0, libc::MS_NODEV),
                "noexec" => (libc::MS_NOEXEC, 0),
                "exec" => (0, libc::MS_NOEXEC),
                "sync" => (libc::MS_SYNCHRONOUS, 0),
                "async" => (0, libc::MS_SYNCHRONOUS),
                "dirsync" => (libc::MS_DIRSYNC, 0),
                "remount" => (libc::MS_REMOUNT, 0),
                "mand" => (libc::MS_MANDLOCK, 0),
                "nomand" => (0, libc::MS_MANDLOCK),
                "atime" => (0, libc::MS_NOATIME),
                "noatime" => (libc::MS_NOATIME, 0),
                "diratime" => (0, libc::MS_NODIRATIME),
                "nodiratime" => (libc::MS_NODIRATIME, 0),
                "relatime" => (libc::MS_RELATIME, 0),
                "norelatime" => (0, libc::MS_RELATIME),
                "strictatime" => (libc::MS_STRICTATIME, 0),
                "nostrictatime" => (0, libc::MS_STRICTATIME),
                "bind" => (libc::MS_BIND, 0),
                "rbind" => (libc::MS_BIND | libc::MS_REC, 0),
                "silent" => (libc::MS_SILENT, 0),
                "loud" => (0, libc::MS_SILENT),
                _ => {
                    let propagation = match option.as_str() {
                        "private" => Some(libc::MS_PRIVATE),
                        "rprivate" => Some(libc::MS_PRIVATE | libc::MS_REC),
                        "shared" => Some(libc::MS_SHARED),
                        "rshared" => Some(libc::MS_SHARED | libc::MS_REC),
                        "slave" => Some(libc::MS_SLAVE),
                        "rslave" => Some(libc::MS_SLAVE | libc::MS_REC),
                        "unbindable" => Some(libc::MS_UNBINDABLE),
                        "runbindable" => Some(libc::MS_UNBINDABLE | libc::MS_REC),
                        _ => None,
                    };
                    match propagation {
                        Some(p) => parsed.propagation.push(p),
                        None => parsed.data.push(option.clone()),
                    }
                    continue;
                }
            };
            parsed.flags = (parsed.flags | set) & !clear;
        }
        parsed
    }

    fn data(&self) -> Option<String> {
        (!self.data.is_empty()).then(|| self.data.join(","))
    }
}

/// What the container's mount namespace gets besides the spec's own mounts.
#[derive(Clone, Copy)]
pub struct RootfsSetup<'a> {
    /// Where the container's root is mounted in the agent's namespace (the overlay).
    pub root: &'a Path,
    /// The pty slave to appear as /dev/console, when the process has a terminal.
    pub console: Option<&'a Path>,
    /// mknod is not allowed in a user namespace: devices are bind-mounted from the guest.
    pub in_user_namespace: bool,
    /// The container's cgroup directory when it has no cgroup namespace: a cgroup mount then
    /// binds this directory, so the container still sees its own cgroup at /sys/fs/cgroup (as
    /// runc does).
    pub cgroup_without_namespace: Option<&'a Path>,
    /// The agent's file with the host's boot id, bound over the container's
    /// `/proc/sys/kernel/random/boot_id` once its /proc is mounted.
    pub boot_id: Option<&'a Path>,
}

/// What the kernel shows as the boot id, which a VM restored from a snapshot shares with every
/// other VM restored from it.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// The devices every container gets (OCI runtime spec, "Default Devices").
const DEFAULT_DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

const DEV_SYMLINKS: [(&str, &str); 5] = [
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
    ("pts/ptmx", "ptmx"),
];

/// Everything up to and including `pivot_root`; the process is then inside its root at `/`.
pub fn enter_root(sys: &dyn Syscall, spec: &Spec, setup: &RootfsSetup) -> Result<(), MountError> {
    let root = setup.root;
    let linux = spec.linux().as_ref();
    let propagation = match linux.and_then(|l| l.rootfs_propagation().as_deref()) {
        Some("shared") => libc::MS_SHARED,
        Some("slave") => libc::MS_SLAVE,
        Some("unbindable") => libc::MS_UNBINDABLE,
        _ => libc::MS_PRIVATE,
    };
    // Nothing mounted from here on may propagate back into the agent's namespace.
    sys.mount(None, Path::new("/"), None, libc::MS_REC | propagation, None)
        .context(|| "make / private".into())?;
    // pivot_root wants a mount point, and the root is one already (the container's overlay):
    // the bind onto itself that runc makes is needed only in a user namespace, where the copy
    // of the overlay is locked to it and pivot_root refuses a locked mount.
    if setup.in_user_namespace {
        sys.mount(
            Some(&root.to_string_lossy()),
            root,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )
        .context(|| format!("bind {} onto itself", root.display()))?;
    }

    let mut dev_is_bound = false;
    for mount in spec.mounts().iter().flatten() {
        mount_one(sys, setup, mount)?;
        if mount.destination() == Path::new("/dev") && is_bind(mount) {
            dev_is_bound = true;
        }
        let is_proc =
            mount.destination() == Path::new("/proc") && mount.typ().as_deref() == Some("proc");
        if is_proc && let Some(boot_id) = setup.boot_id {
            // Now, before the spec's read-only /proc/sys: that bind is recursive and carries
            // this one along, and mounts the spec makes later still go on top.
            bind_boot_id(sys, root, boot_id)?;
        }
    }
    if !dev_is_bound {
        create_devices(sys, spec, setup)?;
    }
    if let Some(console) = setup.console {
        let target = resolve_in_root(sys, root, Path::new("/dev/console"))
            .context(|| "resolve /dev/console".into())?;
        create_mount_point(sys, root, &target, true).context(|| "create /dev/console".into())?;
        sys.mount(
            Some(&console.to_string_lossy()),
            &target,
            None,
            libc::MS_BIND,
            None,
        )
        .context(|| format!("bind {} to /dev/console", console.display()))?;
    }

    // pivot_root(".", "."): the old root ends up stacked on the new one, and a lazy unmount
    // of "." then drops it; no directory in the image is needed for it.
    sys.chdir(root)
        .context(|| format!("chdir {}", root.display()))?;
    sys.pivot_root(Path::new("."), Path::new("."))
        .context(|| "pivot_root".into())?;
    sys.umount(Path::new("."), libc::MNT_DETACH)
        .context(|| "detach the old root".into())?;
    sys.chdir(Path::new("/")).context(|| "chdir /".into())?;
    Ok(())
}

fn mount_one(sys: &dyn Syscall, setup: &RootfsSetup, mount: &Mount) -> Result<(), MountError> {
    let root = setup.root;
    let destination = mount.destination();
    let describe = || format!("mount {}", destination.display());
    let target = resolve_in_root(sys, root, destination).context(describe)?;
    let mut options = MountOptions::parse(mount.options().as_deref().unwrap_or_default());
    let mut bind = is_bind(mount);
    let mut source = mount
        .source()
        .as_ref()
        .map(|s| s.to_string_lossy().into_owned());
    let cgroup = matches!(mount.typ().as_deref(), Some("cgroup" | "cgroup2"));
    if cgroup && let Some(own) = setup.cgroup_without_namespace {
        bind = true;
        source = Some(own.to_string_lossy().into_owned());
        options.flags |= libc::MS_BIND | libc::MS_REC;
    }
    // The guest is cgroup v2 only; a v1-style "cgroup" mount means the unified hierarchy.
    let fstype = match mount.typ().as_deref() {
        _ if bind => None,
        Some("cgroup") => Some("cgroup2"),
        other => other,
    };
    let file = bind
        && source
            .as_deref()
            .is_some_and(|s| matches!(sys.file_kind(Path::new(s)), Ok(Some(FileKind::Other))));
    create_mount_point(sys, root, &target, file).context(describe)?;

    let mut flags = options.flags;
    if bind {
        // A bind mount ignores flags other than MS_BIND/MS_REC; they need a remount.
        sys.mount(
            source.as_deref(),
            &target,
            None,
            flags & (libc::MS_BIND | libc::MS_REC),
            None,
        )
        .context(describe)?;
        let extra = flags & !(libc::MS_BIND | libc::MS_REC | libc::MS_REMOUNT);
        if extra != 0 {
            flags = extra | libc::MS_BIND | libc::MS_REMOUNT;
            sys.mount(None, &target, None, flags, None)
                .context(describe)?;
        }
    } else {
        let data = options.data();
        sys.mount(
            source.as_deref().or(fstype),
            &target,
            fstype,
            flags,
            data.as_deref(),
        )
        .context(describe)?;
    }
    for propagation in &options.propagation {
        sys.mount(None, &target, None, *propagation, None)
            .context(describe)?;
    }
    Ok(())
}

/// Binds `file` read-only over the boot id of the /proc just mounted under `root`.
fn bind_boot_id(sys: &dyn Syscall, root: &Path, file: &Path) -> Result<(), MountError> {
    let describe = || format!("bind the boot id over {BOOT_ID}");
    let target = resolve_in_root(sys, root, Path::new(BOOT_ID)).context(describe)?;
    // A kernel without it (no sysctl) has nothing to replace.
    if sys.file_kind(&target).context(describe)? != Some(FileKind::Other) {
        return Ok(());
    }
    sys.mount(
        Some(&file.to_string_lossy()),
        &target,
        None,
        libc::MS_BIND,
        None,
    )
    .context(describe)?;
    remount_read_only(sys, &target).context(describe)
}

/// A device node to create in the container's `/dev`.
struct DeviceNode {
    path: PathBuf,
    /// `S_IFCHR`, `S_IFBLK` or `S_IFIFO`.
    kind: u32,
    major: u32,
    minor: u32,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// The default devices, then the spec's `linux.devices` (which replace a default at the same
/// path), as the spec describes them.
fn device_nodes(spec: &Spec) -> Vec<DeviceNode> {
    let mut nodes: Vec<DeviceNode> = DEFAULT_DEVICES
        .iter()
        .map(|(name, major, minor)| DeviceNode {
            path: PathBuf::from("/dev").join(name),
            kind: libc::S_IFCHR,
            major: *major,
            minor: *minor,
            mode: 0o666,
            uid: 0,
            gid: 0,
        })
        .collect();
    let spec_devices = spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().as_ref())
        .into_iter()
        .flatten();
    for device in spec_devices {
        let kind = match device.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => libc::S_IFCHR,
            LinuxDeviceType::B => libc::S_IFBLK,
            LinuxDeviceType::P => libc::S_IFIFO,
            LinuxDeviceType::A => continue,
        };
        nodes.retain(|n| n.path != *device.path());
        nodes.push(DeviceNode {
            path: device.path().clone(),
            kind,
            major: device.major() as u32,
            minor: device.minor() as u32,
            mode: device.file_mode().unwrap_or(0o666) & 0o7777,
            uid: device.uid().unwrap_or(0),
            gid: device.gid().unwrap_or(0),
        });
    }
    nodes
}

fn create_devices(sys: &dyn Syscall, spec: &Spec, setup: &RootfsSetup) -> Result<(), MountError> {
    let root = setup.root;
    let dev = resolve_in_root(sys, root, Path::new("/dev")).context(|| "resolve /dev".into())?;
    create_dirs(sys, root, &dev).context(|| "create /dev".into())?;
    for node in device_nodes(spec) {
        let path = &node.path;
        let target =
            resolve_in_root(sys, root, path).context(|| format!("resolve {}", path.display()))?;
        if let Some(parent) = target.parent() {
            create_dirs(sys, root, parent).context(|| format!("create {}", path.display()))?;
        }
        if setup.in_user_namespace {
            create_mount_point(sys, root, &target, true)
                .context(|| format!("create {}", path.display()))?;
            sys.mount(
                Some(&path.to_string_lossy()),
                &target,
                None,
                libc::MS_BIND,
                None,
            )
            .context(|| format!("bind {}", path.display()))?;
            continue;
        }
        // A node the image already has stays as it is, as under runc.
        if sys.file_kind(&target).ok().flatten().is_some() {
            continue;
        }
        sys.mknod(&target, node.kind | node.mode, node.major, node.minor)
            .context(|| format!("mknod {}", path.display()))?;
        // mknod(2) applies the umask; the spec's fileMode is meant exactly.
        sys.chmod(&target, node.mode)
            .context(|| format!("chmod {}", path.display()))?;
        if node.uid != 0 || node.gid != 0 {
            sys.chown(&target, node.uid, node.gid)
                .context(|| format!("chown {}", path.display()))?;
        }
    }
    for (target, name) in DEV_SYMLINKS {
        sys.symlink(Path::new(target), &dev.join(name))
            .context(|| format!("symlink /dev/{name}"))?;
    }
    Ok(())
}

/// After `pivot_root`: hide masked paths, make read-only paths and (if asked) the root read-only.
pub fn protect_paths(sys: &dyn Syscall, spec: &Spec) -> Result<(), MountError> {
    let linux = spec.linux().as_ref();
    for path in linux
        .and_then(|l| l.masked_paths().as_ref())
        .into_iter()
        .flatten()
    {
        let path = Path::new(path);
        match sys.file_kind(path) {
            Ok(None) | Err(Errno(libc::ENOENT)) => {}
            Ok(Some(FileKind::Directory)) => sys
                .mount(Some("tmpfs"), path, Some("tmpfs"), libc::MS_RDONLY, None)
                .context(|| format!("mask {}", path.display()))?,
            Ok(Some(_)) => sys
                .mount(Some("/dev/null"), path, None, libc::MS_BIND, None)
                .context(|| format!("mask {}", path.display()))?,
            Err(errno) => {
                return Err(MountError {
                    what: format!("mask {}", path.display()),
                    errno,
                });
            }
        }
    }
    for path in linux
        .and_then(|l| l.readonly_paths().as_ref())
        .into_iter()
        .flatten()
    {
        let path = Path::new(path);
        if sys.file_kind(path).ok().flatten().is_none() {
            continue;
        }
        let describe = || format!("make {} read-only", path.display());
        sys.mount(
            Some(&path.to_string_lossy()),
            path,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )
        .context(describe)?;
        remount_read_only(sys, path).context(describe)?;
    }
    if spec.root().as_ref().and_then(|r| r.readonly()) == Some(true) {
        remount_read_only(sys, Path::new("/")).context(|| "make the root read-only".into())?;
    }
    Ok(())
}

fn remount_read_only(sys: &dyn Syscall, path: &Path) -> Result<(), Errno> {
    let kept = sys.mount_flags(path)?;
    sys.mount(
        None,
        path,
        None,
        kept | libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::super::syscall::recorder::Recorder;
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).expect("test spec parses")
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let mut sys = Recorder::with_dirs(&["/r", "/r/etc"]);
        sys.links.insert("/r/proc".into(), "/".into());
        sys.links.insert("/r/etc/x".into(), "../../../..".into());
        sys.links.insert("/r/loop".into(), "/loop".into());
        let r = Path::new("/r");
        assert_eq!(resolve_in_root(&sys, r, Path::new("/proc")).unwrap(), r);
        assert_eq!(
            resolve_in_root(&sys, r, Path::new("/proc/sys")).unwrap(),
            Path::new("/r/sys")
        );
        assert_eq!(
            resolve_in_root(&sys, r, Path::new("/etc/x/y")).unwrap(),
            Path::new("/r/y")
        );
        assert_eq!(
            resolve_in_root(&sys, r, Path::new("/../../a")).unwrap(),
            Path::new("/r/a")
        );
        assert_eq!(
            resolve_in_root(&sys, r, Path::new("/loop")),
            Err(Errno(libc::ELOOP))
        );
    }

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let o = MountOptions::parse(
            &["nosuid", "ro", "rw", "rslave", "mode=755", "size=65536k"].map(String::from),
        );
        assert_eq!(o.flags, libc::MS_NOSUID);
        assert_eq!(o.propagation, [libc::MS_SLAVE | libc::MS_REC]);
        assert_eq!(o.data(), Some("mode=755,size=65536k".into()));
    }

    #[test]
    fn runc_default_mounts_then_pivot_in_order() {
        let sys = Recorder::with_dirs(&["/r"]);
        let spec = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs","readonly":true},
            "mounts":[
              {"destination":"/proc","type":"proc","source":"proc"},
              {"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","strictatime","mode=755","size=65536k"]},
              {"destination":"/dev/pts","type":"devpts","source":"devpts","options":["nosuid","noexec","newinstance","ptmxmode=0666"]},
              {"destination":"/sys/fs/cgroup","type":"cgroup","source":"cgroup","options":["ro","nosuid"]},
              {"destination":"/data","type":"bind","source":"/srv","options":["rbind","ro"]}
            ],
            "linux":{"maskedPaths":["/proc/kcore","/proc/acpi"],"readonlyPaths":["/proc/sys"]}}"#,
        );
        let setup = RootfsSetup {
            root: Path::new("/r"),
            console: Some(Path::new("/dev/pts/3")),
            in_user_namespace: false,
            cgroup_without_namespace: None,
            boot_id: None,
        };
        enter_root(&sys, &spec, &setup).unwrap();
        let calls = sys.calls();
        let expect_in_order = [
            "mount / - - 0x44000 -",
            "mkdir /r/proc 755",
            "mount /r/proc proc proc 0x0 -",
            "mkdir /r/dev 755",
            "mount /r/dev tmpfs tmpfs 0x1000002 mode=755,size=65536k",
            "mkdir /r/dev/pts 755",
            "mount /r/dev/pts devpts devpts 0xa newinstance,ptmxmode=0666",
            "mkdir /r/sys 755",
            "mkdir /r/sys/fs 755",
            "mkdir /r/sys/fs/cgroup 755",
            "mount /r/sys/fs/cgroup cgroup cgroup2 0x3 -",
            "mkdir /r/data 755",
            "mount /r/data /srv - 0x5000 -",
            "mount /r/data - - 0x1021 -",
            "mknod /r/dev/null 20666 1:3",
            "mknod /r/dev/tty 20666 5:0",
            "symlink /r/dev/fd /proc/self/fd",
            "symlink /r/dev/ptmx pts/ptmx",
            "create_file /r/dev/console",
            "mount /r/dev/console /dev/pts/3 - 0x1000 -",
            "chdir /r",
            "pivot_root . .",
            "umount . 0x2",
            "chdir /",
        ];
        let mut position = 0;
        for want in expect_in_order {
            let found = calls[position..].iter().position(|c| c == want);
            assert!(
                found.is_some(),
                "{want:?} not found after call {position} in {calls:#?}"
            );
            position += found.unwrap() + 1;
        }

        let sys = Recorder::with_dirs(&["/proc/acpi"]);
        sys.files
            .borrow_mut()
            .insert("/proc/kcore".into(), FileKind::Other);
        sys.files
            .borrow_mut()
            .insert("/proc/sys".into(), FileKind::Directory);
        protect_paths(&sys, &spec).unwrap();
        assert_eq!(
            sys.calls(),
            [
                "mount /proc/kcore /dev/null - 0x1000 -",
                "mount /proc/acpi tmpfs tmpfs 0x1 -",
                "mount /proc/sys /proc/sys - 0x5000 -",
                "mount /proc/sys - - 0x1023 -",
                "mount / - - 0x1023 -",
            ]
        );
    }

    #[test]
    fn the_hosts_boot_id_is_bound_read_only_once_proc_is_mounted() {
        let sys = Recorder::with_dirs(&["/r"]);
        sys.files
            .borrow_mut()
            .insert("/r/proc/sys/kernel/random/boot_id".into(), FileKind::Other);
        let with_proc = spec(
            r#"{"ociVersion":"1.0.2","mounts":[
              {"destination":"/proc","type":"proc","source":"proc"},
              {"destination":"/dev","type":"tmpfs","source":"tmpfs"}],
            "linux":{"readonlyPaths":["/proc/sys"]}}"#,
        );
        let setup = RootfsSetup {
            root: Path::new("/r"),
            console: None,
            in_user_namespace: false,
            cgroup_without_namespace: None,
            boot_id: Some(Path::new("/run/cocoon/boot_id")),
        };
        enter_root(&sys, &with_proc, &setup).unwrap();
        let mounts = sys.calls_of("mount");
        let proc = mounts
            .iter()
            .position(|c| c == "mount /r/proc proc proc 0x0 -")
            .expect("proc mounted");
        assert_eq!(
            mounts[proc + 1..proc + 3],
            [
                "mount /r/proc/sys/kernel/random/boot_id /run/cocoon/boot_id - 0x1000 -",
                "mount /r/proc/sys/kernel/random/boot_id - - 0x1023 -",
            ]
        );
        assert_eq!(mounts[proc + 3], "mount /r/dev tmpfs tmpfs 0x0 -");
        // The root is the overlay, a mount point already: no bind onto itself outside a user
        // namespace.
        assert!(
            !mounts.iter().any(|c| c.starts_with("mount /r /r ")),
            "{mounts:#?}"
        );

        // No /proc of its own, or no boot id from the host: nothing to bind.
        for (spec_json, boot_id) in [
            (
                r#"{"ociVersion":"1.0.2","mounts":[{"destination":"/dev","type":"tmpfs","source":"tmpfs"}]}"#,
                Some(Path::new("/run/cocoon/boot_id")),
            ),
            (
                r#"{"ociVersion":"1.0.2","mounts":[{"destination":"/proc","type":"proc","source":"proc"}]}"#,
                None,
            ),
        ] {
            let sys = Recorder::with_dirs(&["/r"]);
            sys.files
                .borrow_mut()
                .insert("/r/proc/sys/kernel/random/boot_id".into(), FileKind::Other);
            let setup = RootfsSetup { boot_id, ..setup };
            enter_root(&sys, &spec(spec_json), &setup).unwrap();
            assert!(
                !sys.calls().iter().any(|c| c.contains("boot_id")),
                "{:#?}",
                sys.calls()
            );
        }
    }

    #[test]
    fn spec_devices_get_exactly_their_mode_and_owner() {
        let sys = Recorder::with_dirs(&["/r"]);
        let spec = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
            "linux":{"devices":[
              {"path":"/dev/fuse","type":"c","major":10,"minor":229,"fileMode":438},
              {"path":"/dev/disk/sda","type":"b","major":8,"minor":0,"fileMode":432,"uid":5,"gid":6},
              {"path":"/dev/null","type":"c","major":1,"minor":3,"fileMode":384}
            ]}}"#,
        );
        let setup = RootfsSetup {
            root: Path::new("/r"),
            console: None,
            in_user_namespace: false,
            cgroup_without_namespace: None,
            boot_id: None,
        };
        enter_root(&sys, &spec, &setup).unwrap();
        let calls = sys.calls();
        let after = |call: &str| calls.iter().position(|c| c == call);
        let fuse = after("mknod /r/dev/fuse 20666 10:229").expect("fuse made");
        assert_eq!(calls[fuse + 1], "chmod /r/dev/fuse 666");
        let disk = after("mknod /r/dev/disk/sda 60660 8:0").expect("disk made");
        assert_eq!(
            calls[disk + 1..disk + 3],
            ["chmod /r/dev/disk/sda 660", "chown /r/dev/disk/sda 5:6"]
        );
        // The spec's /dev/null replaces the default one, once.
        assert_eq!(
            sys.calls_of("mknod")
                .iter()
                .filter(|c| c.contains("dev/null"))
                .count(),
            1
        );
        assert!(after("chmod /r/dev/null 600").is_some());
    }

    #[test]
    fn user_namespaces_bind_devices_instead_of_mknod() {
        let sys = Recorder::with_dirs(&["/r"]);
        let setup = RootfsSetup {
            root: Path::new("/r"),
            console: None,
            in_user_namespace: true,
            cgroup_without_namespace: None,
            boot_id: None,
        };
        enter_root(&sys, &spec(r#"{"ociVersion":"1.0.2"}"#), &setup).unwrap();
        assert!(sys.calls_of("mknod").is_empty());
        // The overlay's copy is locked in the namespace: pivot_root needs a bind of its own.
        assert_eq!(sys.calls_of("mount")[1], "mount /r /r - 0x5000 -");
        assert!(
            sys.calls()
                .contains(&"mount /r/dev/null /dev/null - 0x1000 -".to_owned())
        );
    }

    #[test]
    fn without_a_cgroup_namespace_the_cgroup_mount_binds_the_containers_own_cgroup() {
        let sys = Recorder::with_dirs(&["/r"]);
        let spec = spec(
            r#"{"ociVersion":"1.0.2","mounts":[{"destination":"/sys/fs/cgroup","type":"cgroup","source":"cgroup","options":["ro","nosuid"]}]}"#,
        );
        let setup = RootfsSetup {
            root: Path::new("/r"),
            console: None,
            in_user_namespace: false,
            cgroup_without_namespace: Some(Path::new("/sys/fs/cgroup/containers/c1")),
            boot_id: None,
        };
        enter_root(&sys, &spec, &setup).unwrap();
        let mounts = sys.calls_of("mount");
        assert!(
            mounts.contains(
                &"mount /r/sys/fs/cgroup /sys/fs/cgroup/containers/c1 - 0x5000 -".to_owned()
            ),
            "{mounts:#?}"
        );
        assert!(
            mounts.contains(&"mount /r/sys/fs/cgroup - - 0x1023 -".to_owned()),
            "{mounts:#?}"
        );
    }

    #[test]
    fn a_failed_mount_names_its_destination() {
        let mut sys = Recorder::with_dirs(&["/r"]);
        sys.failing.insert("mount /r/proc".into());
        let spec = spec(
            r#"{"ociVersion":"1.0.2","mounts":[{"destination":"/proc","type":"proc","source":"proc"}]}"#,
        );
        let setup = RootfsSetup {
            root: Path::new("/r"),
            console: None,
            in_user_namespace: false,
            cgroup_without_namespace: None,
            boot_id: None,
        };
        let err = enter_root(&sys, &spec, &setup).unwrap_err();
        assert_eq!(err.what, "mount /proc");
        assert_eq!(err.errno, Errno(libc::EPERM));
    }
}
