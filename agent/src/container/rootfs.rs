//! A container's root filesystem in the agent's namespace: each read-only EROFS layer device
//! mounted on its own, stacked with overlayfs under a writable upper layer on a tmpfs that
//! belongs to the container alone. Removal unmounts the lot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::syscall::{Errno, Syscall};

/// The agent's state that is not a container's: the boot id file, for one.
pub const RUNTIME_DIR: &str = "/run/cocoon";
pub const CONTAINERS_DIR: &str = "/run/cocoon/containers";

/// How long a layer disk may show no capacity before create gives up on it.
pub const CAPACITY_TIMEOUT: Duration = Duration::from_secs(30);

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
    Ok(())
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
    pub fn mount(
        sys: &dyn Syscall,
        id: &str,
        layers: &[PathBuf],
        host_files: Option<&Path>,
    ) -> Result<Rootfs, RootfsError> {
        if layers.is_empty() {
            return Err(RootfsError::NoLayers);
        }
        let base = Path::new(CONTAINERS_DIR).join(id);
        let mut rootfs = Rootfs {
            root: base.join("rootfs"),
            base,
            mounted: Vec::new(),
        };
        match rootfs.mount_all(sys, layers, host_files) {
            Ok(()) => Ok(rootfs),
            Err(e) => {
                rootfs.unmount(sys);
                Err(e)
            }
        }
    }

    fn mount_all(
        &mut self,
        sys: &dyn Syscall,
        layers: &[PathBuf],
        host_files: Option<&Path>,
    ) -> Result<(), RootfsError> {
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
        for dir in ["layers", "upper", "work", "rootfs"] {
            let dir = base.join(dir);
            context(sys.mkdir(&dir, 0o755), || {
                format!("create {}", dir.display())
            })?;
        }
        if let Some(device) = host_files {
            let target = base.join("host");
            self.mount_erofs(sys, device, &target, "the host files")?;
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
    /// unmount takes the mounts below with it: one call for the lot.
    pub fn unmount(&mut self, sys: &dyn Syscall) {
        if let Some(base) = self.mounted.first()
            && let Err(errno) = sys.umount(base, libc::MNT_DETACH)
        {
            tracing_line(&format!("cannot unmount {}: {errno}", base.display()));
        }
        self.mounted.clear();
        let _ = sys.rmdir(&self.base);
    }
}

fn tracing_line(message: &str) {
    crate::console::line(&format!("cocoon-agent: {message}"));
}

#[cfg(test)]
mod tests {
    use super::super::syscall::recorder::Recorder;
    use super::*;

    #[test]
    fn layers_stack_lowest_last_under_a_tmpfs_upper() {
        let sys = Recorder::default();
        let layers = [PathBuf::from("/dev/vdb"), PathBuf::from("/dev/vdc")];
        let mut rootfs = Rootfs::mount(&sys, "c1", &layers, None).unwrap();
        assert_eq!(rootfs.root, Path::new("/run/cocoon/containers/c1/rootfs"));
        let mounts = sys.calls_of("mount");
        assert_eq!(
            mounts,
            [
                "mount /run/cocoon/containers/c1 tmpfs tmpfs 0x6 mode=0711",
                "mount /run/cocoon/containers/c1/layers/0 /dev/vdb erofs 0x5 -",
                "mount /run/cocoon/containers/c1/layers/1 /dev/vdc erofs 0x5 -",
                "mount /run/cocoon/containers/c1/rootfs overlay overlay 0x0 lowerdir=/run/cocoon/containers/c1/layers/1:/run/cocoon/containers/c1/layers/0,upperdir=/run/cocoon/containers/c1/upper,workdir=/run/cocoon/containers/c1/work",
            ]
        );
        rootfs.unmount(&sys);
        // The base tmpfs holds every other mount: detaching it takes them along.
        assert_eq!(
            sys.calls_of("umount"),
            ["umount /run/cocoon/containers/c1 0x2"]
        );
        assert_eq!(sys.calls_of("rmdir"), ["rmdir /run/cocoon/containers/c1"]);
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
        let err = Rootfs::mount(&sys, "c1", &layers, None).unwrap_err();
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
