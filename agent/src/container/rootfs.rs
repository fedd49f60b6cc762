//! A container's root filesystem in the agent's namespace: each read-only EROFS layer device
//! mounted on its own, stacked with overlayfs under a writable upper layer on a tmpfs that
//! belongs to the container alone. Removal unmounts the lot, and checks the agent's mount table
//! that nothing under the container's directory is left.
//!
//! Mount propagation is kept out of it: the containers' directory is a mount of its own,
//! unbindable (so private), and each container's tmpfs is made private, so no mount made in a
//! container's namespace (a copy of the agent's) reaches the agent's, nor the other way round,
//! whatever the propagation of the guest's root.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::syscall::{Errno, Syscall};

/// The agent's state that is not a container's: the boot id file, for one.
pub const RUNTIME_DIR: &str = "/run/cocoon";
pub const CONTAINERS_DIR: &str = "/run/cocoon/containers";

/// How long a layer disk may show no capacity before create gives up on it.
pub const CAPACITY_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent's mount table, as the agent sees it: what a look at `/proc/1/mounts` shows.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// How many times removal detaches what is still mounted under a container's directory before
/// it gives up: one detach takes the lot, unless something was stacked on the base or mounted
/// under it meanwhile.
const DETACH_ROUNDS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("the container has no root filesystem layers")]
    NoLayers,
    #[error("layer {0:?} is neither /dev/vdX nor serial:ID")]
    BadLayerName(String),
    #[error("no virtio disk has serial {0:?}")]
    UnknownSerial(String),
    #[error("{device} still has no capacity after {waited:?}: its image never arrived")]
    NoCapacity { device: String, waited: Duration },
    #[error("{what}: {errno}")]
    Sys { what: String, errno: Errno },
    #[error("{}", still_mounted(base, left, *rounds, last.as_ref()))]
    StillMounted {
        base: PathBuf,
        /// The outermost mount points still under `base`, as the agent's mount table lists them.
        left: Vec<PathBuf>,
        rounds: usize,
        /// The last detach that failed, if one did.
        last: Option<(PathBuf, Errno)>,
    },
    #[error("{error}; and what it had mounted stays: {cleanup}")]
    Cleanup {
        error: Box<RootfsError>,
        cleanup: Box<RootfsError>,
    },
}

fn still_mounted(
    base: &Path,
    left: &[PathBuf],
    rounds: usize,
    last: Option<&(PathBuf, Errno)>,
) -> String {
    let left: Vec<String> = left.iter().map(|p| p.display().to_string()).collect();
    let cause = last.map_or(String::new(), |(target, errno)| {
        format!("; unmount {}: {errno}", target.display())
    });
    format!(
        "the root filesystem under {} is still mounted after {rounds} detaches ({}){cause}",
        base.display(),
        left.join(", ")
    )
}

fn context<T>(result: Result<T, Errno>, what: impl FnOnce() -> String) -> Result<T, RootfsError> {
    result.map_err(|errno| RootfsError::Sys {
        what: what(),
        errno,
    })
}

/// The guest device path of a layer: `/dev/vdX` as given, or the virtio disk whose serial is ID.
pub fn layer_device(name: &str) -> Result<PathBuf, RootfsError> {
    if let Some(serial) = name.strip_prefix("serial:") {
        let entries = std::fs::read_dir("/sys/block").map_err(|e| RootfsError::Sys {
            what: "list /sys/block".into(),
            errno: e.into(),
        })?;
        for entry in entries.flatten() {
            let disk = entry.file_name().to_string_lossy().into_owned();
            let found = std::fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
            if is_virtio_disk(&disk) && found.trim_end_matches(['\0', '\n']) == serial {
                return Ok(Path::new("/dev").join(disk));
            }
        }
        return Err(RootfsError::UnknownSerial(serial.to_owned()));
    }
    match name.strip_prefix("/dev/") {
        Some(disk) if is_virtio_disk(disk) => Ok(PathBuf::from(name)),
        _ => Err(RootfsError::BadLayerName(name.to_owned())),
    }
}

/// Creates the directories every container's state lives under. Once per guest, at boot.
pub fn prepare_runtime_dirs(sys: &dyn Syscall) -> Result<(), RootfsError> {
    // Traversable by all (0711): the root of a user namespace is an unprivileged uid of the
    // guest and must still reach its rootfs below these.
    for dir in [RUNTIME_DIR, CONTAINERS_DIR] {
        context(sys.mkdir(Path::new(dir), 0o711), || format!("create {dir}"))?;
    }
    isolate_containers_dir(sys)
}

/// Makes the containers' directory a mount of its own, unbindable: private, so that whatever
/// the guest's root propagates, no mount event crosses between the agent's namespace and the
/// containers' copies of it; and left out of a recursive bind a container makes (of /run, say),
/// so one container never sees another's root filesystem.
fn isolate_containers_dir(sys: &dyn Syscall) -> Result<(), RootfsError> {
    let dir = Path::new(CONTAINERS_DIR);
    context(
        sys.mount(Some(CONTAINERS_DIR), dir, None, libc::MS_BIND, None),
        || format!("bind {CONTAINERS_DIR} onto itself"),
    )?;
    context(
        sys.mount(None, dir, None, libc::MS_UNBINDABLE, None),
        || format!("make {CONTAINERS_DIR} unbindable"),
    )
}

/// Waits until the disk at `device` (`/dev/vdX`) has a non-zero size. A VM restored from a
/// template gets its images in disks that were empty when the snapshot was taken: the guest
/// kernel learns the new capacity from a config-change interrupt, on a workqueue, possibly
/// after the host's create request has arrived. A cold-booted disk has its size already: one
/// read. A disk without a size file is left for the mount to report.
pub fn wait_for_capacity(
    sys: &dyn Syscall,
    device: &Path,
    timeout: Duration,
) -> Result<(), RootfsError> {
    let Some(disk) = device.file_name() else {
        return Ok(());
    };
    let size_file = Path::new("/sys/block").join(disk).join("size");
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match sys.read_file(&size_file) {
            Ok(size) if size.trim() != "0" => return Ok(()),
            Ok(_) => {}
            Err(_) => return Ok(()),
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(RootfsError::NoCapacity {
                device: device.display().to_string(),
                waited,
            });
        }
        std::thread::sleep(pause.min(timeout - waited));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

fn is_virtio_disk(name: &str) -> bool {
    name.strip_prefix("vd")
        .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase()))
}

/// The mounts that make up one container's root, in the order they were made.
#[derive(Debug)]
pub struct Rootfs {
    pub base: PathBuf,
    /// The overlay: what the container gets as `/`.
    pub root: PathBuf,
    mounted: Vec<PathBuf>,
}

impl Rootfs {
    /// Mounts `layers` (device paths, lowest first) and the overlay for container `id`. On
    /// failure, whatever was mounted is unmounted again.
    pub fn mount(sys: &dyn Syscall, id: &str, layers: &[PathBuf]) -> Result<Rootfs, RootfsError> {
        if layers.is_empty() {
            return Err(RootfsError::NoLayers);
        }
        let base = Path::new(CONTAINERS_DIR).join(id);
        let mut rootfs = Rootfs {
            root: base.join("rootfs"),
            base,
            mounted: Vec::new(),
        };
        match rootfs.mount_all(sys, layers) {
            Ok(()) => Ok(rootfs),
            Err(error) => match rootfs.unmount(sys) {
                Ok(()) => Err(error),
                Err(cleanup) => Err(RootfsError::Cleanup {
                    error: Box::new(error),
                    cleanup: Box::new(cleanup),
                }),
            },
        }
    }

    fn mount_all(&mut self, sys: &dyn Syscall, layers: &[PathBuf]) -> Result<(), RootfsError> {
        let base = self.base.clone();
        // Under the directories prepare_runtime_dirs made at boot, and 0711 like them: the root
        // of a user namespace is an unprivileged uid of the guest and must still reach its
        // rootfs below.
        context(sys.mkdir(&base, 0o711), || {
            format!("create {}", base.display())
        })?;
        // The upper layer's tmpfs: the container's writes, gone with one unmount.
        context(
            sys.mount(
                Some("tmpfs"),
                &base,
                Some("tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV,
                Some("mode=0711"),
            ),
            || format!("mount tmpfs on {}", base.display()),
        )?;
        self.mounted.push(base.clone());
        // Private before anything is mounted on it, so the layers and the overlay are too: the
        // containers' directory is unbindable, but a guest whose boot could not make it so must
        // not have this container's mounts copied into, or taken from, other namespaces.
        context(sys.mount(None, &base, None, libc::MS_PRIVATE, None), || {
            format!("make {} private", base.display())
        })?;
        for dir in ["layers", "upper", "work", "rootfs"] {
            let dir = base.join(dir);
            context(sys.mkdir(&dir, 0o755), || {
                format!("create {}", dir.display())
            })?;
        }
        let mut lower = Vec::new();
        for (index, device) in layers.iter().enumerate() {
            let target = base.join("layers").join(index.to_string());
            self.mount_erofs(sys, device, &target, "layer")?;
            lower.push(target);
        }
        // overlayfs lists the top layer first.
        let lowerdir: Vec<String> = lower
            .iter()
            .rev()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lowerdir.join(":"),
            base.join("upper").display(),
            base.join("work").display()
        );
        context(
            sys.mount(Some("overlay"), &self.root, Some("overlay"), 0, Some(&data)),
            || "mount the overlay root".into(),
        )?;
        self.mounted.push(self.root.clone());
        Ok(())
    }

    /// Mounts the read-only EROFS image on `device` at `target` (created), to be unmounted
    /// with the rest.
    fn mount_erofs(
        &mut self,
        sys: &dyn Syscall,
        device: &Path,
        target: &Path,
        what: &str,
    ) -> Result<(), RootfsError> {
        wait_for_capacity(sys, device, CAPACITY_TIMEOUT)?;
        context(sys.mkdir(target, 0o755), || {
            format!("create {}", target.display())
        })?;
        context(
            sys.mount(
                Some(&device.to_string_lossy()),
                target,
                Some("erofs"),
                libc::MS_RDONLY | libc::MS_NODEV,
                None,
            ),
            || format!("mount {what} {} (EROFS)", device.display()),
        )?;
        self.mounted.push(target.to_owned());
        Ok(())
    }

    /// Unmounts everything. Lazy: a process that still holds a file keeps it, but the mounts
    /// are gone from the namespace. Every other mount is below the base tmpfs, and a lazy
    /// unmount takes the mounts below with it: one call for the lot. The agent's mount table
    /// then says whether anything under the base is left (a mount stacked on the base, or made
    /// under it by someone else), and that is detached in turn, a few rounds at most. On
    /// failure the mounts are still recorded, for a later call to try again.
    pub fn unmount(&mut self, sys: &dyn Syscall) -> Result<(), RootfsError> {
        if !self.mounted.is_empty() {
            self.detach_all(sys)?;
            self.mounted.clear();
        }
        // An empty directory on the agent's root now; one left behind is reused by the next
        // container of this name, and is no mount.
        let _ = sys.rmdir(&self.base);
        Ok(())
    }

    fn detach_all(&self, sys: &dyn Syscall) -> Result<(), RootfsError> {
        let mut targets = vec![self.base.clone()];
        let mut last = None;
        for _ in 0..DETACH_ROUNDS {
            for target in &targets {
                if let Err(errno) = sys.umount(target, libc::MNT_DETACH) {
                    last = Some((target.clone(), errno));
                }
            }
            targets = self.mounted_under_base(sys)?;
            if targets.is_empty() {
                return Ok(());
            }
        }
        Err(RootfsError::StillMounted {
            base: self.base.clone(),
            left: targets,
            rounds: DETACH_ROUNDS,
            last,
        })
    }

    /// The outermost mount points under the base (the base itself included, once per mount
    /// stacked there) in the agent's mount table: detaching those takes the rest along.
    fn mounted_under_base(&self, sys: &dyn Syscall) -> Result<Vec<PathBuf>, RootfsError> {
        let table = context(sys.read_file(Path::new(MOUNTINFO)), || {
            format!("read {MOUNTINFO}")
        })?;
        let under: Vec<PathBuf> = mount_points(&table)
            .into_iter()
            .filter(|p| p.starts_with(&self.base))
            .collect();
        Ok(outermost(under))
    }
}

/// The mount points of a mountinfo table (its fifth field), in its order.
fn mount_points(table: &str) -> Vec<PathBuf> {
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_octal)
        .collect()
}

/// Undoes the kernel's escapes in a mountinfo path: space, tab, newline and backslash appear
/// as `\040`, `\011`, `\012` and `\134`.
fn unescape_octal(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match octal_escape(&bytes[i..]) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// The byte that `rest` starts with an escape of (a backslash and three octal digits).
fn octal_escape(rest: &[u8]) -> Option<u8> {
    let (b'\\', digits) = rest.split_first()? else {
        return None;
    };
    let digits = digits.get(..3)?;
    if !digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
        return None;
    }
    let value = digits.iter().fold(0u32, |n, d| n * 8 + u32::from(d - b'0'));
    u8::try_from(value).ok()
}

/// The paths not below another one of `paths` (equal ones are all kept: mounts stacked on one
/// mount point are detached one per call).
fn outermost(paths: Vec<PathBuf>) -> Vec<PathBuf> {
    let below_another = |p: &PathBuf| paths.iter().any(|q| q != p && p.starts_with(q));
    paths
        .iter()
        .filter(|p| !below_another(p))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::syscall::recorder::Recorder;
    use super::*;

    #[test]
    fn layers_stack_lowest_last_under_a_tmpfs_upper() {
        let sys = Recorder::default();
        let layers = [PathBuf::from("/dev/vdb"), PathBuf::from("/dev/vdc")];
        let mut rootfs = Rootfs::mount(&sys, "c1", &layers).unwrap();
        assert_eq!(rootfs.root, Path::new("/run/cocoon/containers/c1/rootfs"));
        let mounts = sys.calls_of("mount");
        assert_eq!(
            mounts,
            [
                "mount /run/cocoon/containers/c1 tmpfs tmpfs 0x6 mode=0711",
                // MS_PRIVATE, before anything is mounted on it.
                "mount /run/cocoon/containers/c1 - - 0x40000 -",
                "mount /run/cocoon/containers/c1/layers/0 /dev/vdb erofs 0x5 -",
                "mount /run/cocoon/containers/c1/layers/1 /dev/vdc erofs 0x5 -",
                "mount /run/cocoon/containers/c1/rootfs overlay overlay 0x0 lowerdir=/run/cocoon/containers/c1/layers/1:/run/cocoon/containers/c1/layers/0,upperdir=/run/cocoon/containers/c1/upper,workdir=/run/cocoon/containers/c1/work",
            ]
        );
        rootfs.unmount(&sys).unwrap();
        // The base tmpfs holds every other mount: detaching it takes them along, and the
        // mount table then shows nothing under it.
        assert_eq!(
            sys.calls_of("umount"),
            ["umount /run/cocoon/containers/c1 0x2"]
        );
        assert!(sys.mounts.borrow().is_empty(), "{:?}", sys.mounts);
        assert_eq!(sys.calls_of("rmdir"), ["rmdir /run/cocoon/containers/c1"]);
    }

    #[test]
    fn the_containers_dir_is_an_unbindable_mount_of_its_own() {
        let sys = Recorder::default();
        prepare_runtime_dirs(&sys).unwrap();
        assert_eq!(
            sys.calls(),
            [
                "mkdir /run/cocoon 711",
                "mkdir /run/cocoon/containers 711",
                "mount /run/cocoon/containers /run/cocoon/containers - 0x1000 -",
                // MS_UNBINDABLE: private, and out of any recursive bind.
                "mount /run/cocoon/containers - - 0x20000 -",
            ]
        );
    }

    #[test]
    fn a_mount_stacked_on_the_base_is_detached_in_turn() {
        let sys = Recorder::default();
        // Under the container's tmpfs, as a propagated copy would be: the first detach takes
        // the container's own mounts and uncovers it.
        sys.mounts
            .borrow_mut()
            .push("/run/cocoon/containers/c1".into());
        let mut rootfs = Rootfs::mount(&sys, "c1", &[PathBuf::from("/dev/vdb")]).unwrap();
        rootfs.unmount(&sys).unwrap();
        assert_eq!(
            sys.calls_of("umount"),
            [
                "umount /run/cocoon/containers/c1 0x2",
                "umount /run/cocoon/containers/c1 0x2"
            ]
        );
        assert!(sys.mounts.borrow().is_empty(), "{:?}", sys.mounts);
    }

    #[test]
    fn a_mount_left_under_the_base_is_detached_by_its_own_path() {
        let sys = Recorder::default();
        // On the agent's root under the container's name, not on its tmpfs (made before the
        // tmpfs covered the name): detaching the tmpfs uncovers them instead of taking them.
        sys.mounts.borrow_mut().extend([
            PathBuf::from("/run/cocoon/containers/c1/rootfs/proc"),
            PathBuf::from("/run/cocoon/containers/c1/rootfs/proc/sys"),
            // Another container's, whose name starts the same: not this one's to detach.
            PathBuf::from("/run/cocoon/containers/c10"),
        ]);
        let mut rootfs = Rootfs::mount(&sys, "c1", &[PathBuf::from("/dev/vdb")]).unwrap();
        rootfs.unmount(&sys).unwrap();
        assert_eq!(
            sys.calls_of("umount"),
            [
                "umount /run/cocoon/containers/c1 0x2",
                "umount /run/cocoon/containers/c1/rootfs/proc 0x2"
            ]
        );
        assert_eq!(
            *sys.mounts.borrow(),
            [PathBuf::from("/run/cocoon/containers/c10")]
        );
    }

    #[test]
    fn a_root_that_stays_mounted_is_an_error_and_kept_for_another_try() {
        let mut sys = Recorder::default();
        let mut rootfs = Rootfs::mount(&sys, "c1", &[PathBuf::from("/dev/vdb")]).unwrap();
        sys.failing
            .insert("umount /run/cocoon/containers/c1".into());
        let err = rootfs.unmount(&sys).unwrap_err();
        assert!(matches!(err, RootfsError::StillMounted { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "the root filesystem under /run/cocoon/containers/c1 is still mounted after 4 \
             detaches (/run/cocoon/containers/c1); unmount /run/cocoon/containers/c1: \
             Operation not permitted (os error 1)"
        );
        assert_eq!(sys.calls_of("umount").len(), DETACH_ROUNDS);
        assert!(sys.calls_of("rmdir").is_empty(), "a mount point stays");

        sys.failing.clear();
        rootfs.unmount(&sys).unwrap();
        assert!(sys.mounts.borrow().is_empty(), "{:?}", sys.mounts);
        assert_eq!(sys.calls_of("rmdir"), ["rmdir /run/cocoon/containers/c1"]);
    }

    #[test]
    fn a_failed_create_that_cannot_unmount_says_both() {
        let mut sys = Recorder::default();
        sys.failing
            .insert("mount /run/cocoon/containers/c1/rootfs".into());
        sys.failing
            .insert("umount /run/cocoon/containers/c1".into());
        let err = Rootfs::mount(&sys, "c1", &[PathBuf::from("/dev/vdb")]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("mount the overlay root: Operation not permitted"),
            "{text}"
        );
        assert!(text.contains("is still mounted after 4 detaches"), "{text}");
    }

    #[test]
    fn mountinfo_paths_are_unescaped_and_the_outermost_kept() {
        let table = "22 1 0:21 / /proc rw,relatime - proc proc rw\n\
                     40 1 0:40 / /run/a\\040b rw - tmpfs tmpfs rw\n\
                     41 40 0:41 / /run/a\\040b/c\\134d rw shared:4 - tmpfs tmpfs rw\n";
        let points = mount_points(table);
        assert_eq!(
            points,
            [
                PathBuf::from("/proc"),
                PathBuf::from("/run/a b"),
                PathBuf::from("/run/a b/c\\d")
            ]
        );
        // Not octal, or too short: kept as it is.
        assert_eq!(unescape_octal("/x\\09y\\1"), Path::new("/x\\09y\\1"));
        let stacked = vec![
            PathBuf::from("/b"),
            PathBuf::from("/b/l/0"),
            PathBuf::from("/b"),
            PathBuf::from("/bc"),
        ];
        assert_eq!(
            outermost(stacked),
            [
                PathBuf::from("/b"),
                PathBuf::from("/b"),
                PathBuf::from("/bc")
            ]
        );
    }

    #[test]
    fn a_disk_with_its_size_costs_one_read_and_an_empty_one_times_out_by_name() {
        let mut sys = Recorder::default();
        sys.contents
            .insert("/sys/block/vdb/size".into(), "4096\n".into());
        sys.contents
            .insert("/sys/block/vdc/size".into(), "0\n".into());
        wait_for_capacity(&sys, Path::new("/dev/vdb"), CAPACITY_TIMEOUT).unwrap();
        // No size file: the mount says what is wrong with the device.
        wait_for_capacity(&sys, Path::new("/dev/vdz"), CAPACITY_TIMEOUT).unwrap();
        let start = Instant::now();
        let err =
            wait_for_capacity(&sys, Path::new("/dev/vdc"), Duration::from_millis(30)).unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert!(matches!(err, RootfsError::NoCapacity { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("/dev/vdc still has no capacity"),
            "{err}"
        );
    }

    #[test]
    fn a_failed_layer_unmounts_what_was_mounted() {
        let mut sys = Recorder::default();
        sys.failing
            .insert("mount /run/cocoon/containers/c1/layers/1".into());
        let layers = [PathBuf::from("/dev/vdb"), PathBuf::from("/dev/vdc")];
        let err = Rootfs::mount(&sys, "c1", &layers).unwrap_err();
        assert!(err.to_string().contains("/dev/vdc"), "{err}");
        assert_eq!(
            sys.calls_of("umount"),
            ["umount /run/cocoon/containers/c1 0x2"]
        );
    }

    #[test]
    fn layer_names_cannot_point_outside_dev() {
        assert_eq!(layer_device("/dev/vdb").unwrap(), Path::new("/dev/vdb"));
        for bad in [
            "/dev/../etc/passwd",
            "/dev/sda",
            "vdb",
            "/dev/vd",
            "/dev/vdB",
        ] {
            assert!(
                matches!(layer_device(bad), Err(RootfsError::BadLayerName(_))),
                "{bad}"
            );
        }
    }
}
