//! Host files a spec bind-mounts (`/etc/hosts`, `/etc/resolv.conf` and `/run/.containerenv`
//! from Podman, volumes) cannot be shared into the guest as they are: there is no shared
//! filesystem, only block devices. They are copied into one more read-only EROFS image, and
//! the mounts' sources rewritten to where the agent mounts it. Writes to them stay in the
//! guest. Binds of `/proc`, `/sys` and `/dev` paths mean the sandbox's own and are left alone;
//! a bind at `/dev/shm` becomes a tmpfs of the guest's.
//!
//! A source is resolved (symlinks and all) before anything is decided about it, and only
//! regular files, directories and symlinks are copied: nothing else on the host is ever
//! opened (every entry is first opened `O_PATH`, which opens no device and waits on no FIFO,
//! and reopened only once it is known to be a file or a directory). A source that is a device,
//! FIFO or socket is refused with an error naming the mount, since the container could not
//! use it through a copy; such files inside a copied directory are left out, with a warning
//! naming each. Symlinks inside a directory are copied as symlinks, never followed on the
//! host. All of a container's host files together are bounded (`host_files_max_mib`).

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cocoon_agent_protocol::spec::is_bind;
use oci_spec::runtime::{Mount, MountBuilder, Spec};

use cocoon_agent_protocol::message::host_files_dir;

use crate::images::ImageError;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Io { what, path, source }
}

fn guest_own(source: &Path) -> bool {
    ["/proc", "/sys", "/dev"]
        .iter()
        .any(|p| source.starts_with(p))
}

fn shm() -> Mount {
    MountBuilder::default()
        .destination("/dev/shm")
        .typ("tmpfs")
        .source("shm")
        .options(
            ["nosuid", "nodev", "noexec", "mode=1777", "size=65536k"]
                .map(String::from)
                .to_vec(),
        )
        .build()
        .expect("a fixed, valid mount")
}

/// What a file that is not copied is, for messages.
fn kind(meta: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_symlink() {
        "symlink"
    } else {
        "special file"
    }
}

/// Opens `path` without following its last component and without opening what it names
/// (`O_PATH`): a device's driver is not called, a FIFO not waited on.
fn open_path(path: &Path) -> std::io::Result<(File, Metadata)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    Ok((file, meta))
}

/// The path that reaches exactly the file `fd` holds, whatever was renamed meanwhile.
fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Copies into `staging`, counting the bytes against the limit.
struct Copier<'a> {
    /// The mount being copied, for messages.
    destination: &'a Path,
    /// Bytes all mounts may still copy.
    left: u64,
    limit: u64,
}

impl Copier<'_> {
    fn charge(&mut self, bytes: u64, source: &Path) -> Result<(), ImageError> {
        match self.left.checked_sub(bytes) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => Err(ImageError::HostFilesTooLarge {
                destination: self.destination.to_owned(),
                path: source.to_owned(),
                limit_mib: self.limit >> 20,
            }),
        }
    }

    /// Copies the top of a mount's source: `source` is its resolved path.
    fn copy_source(&mut self, source: &Path, target: &Path) -> Result<(), ImageError> {
        let (file, meta) = open_path(source).map_err(io("open", source))?;
        if meta.is_dir() || meta.is_file() {
            return self.copy(&file, &meta, source, target);
        }
        Err(ImageError::HostFileKind {
            destination: self.destination.to_owned(),
            path: source.to_owned(),
            kind: kind(&meta),
        })
    }

    /// Copies the file or directory `file` (opened `O_PATH`), known to the user as `shown`.
    fn copy(
        &mut self,
        file: &File,
        meta: &Metadata,
        shown: &Path,
        target: &Path,
    ) -> Result<(), ImageError> {
        if meta.is_dir() {
            self.copy_dir(file, shown, target)?;
            let made = File::open(target).map_err(io("open", target))?;
            return keep_metadata(&made, meta, target);
        }
        self.charge(meta.len(), shown)?;
        // The O_PATH file is a regular file: reopening it through /proc opens that very file.
        let mut source = File::open(fd_path(file)).map_err(io("open", shown))?;
        let mut made =
            crate::state::create_new_file(target, 0o600).map_err(io("create", target))?;
        // No more than the budget even if the file grows while it is read.
        let copied = std::io::copy(
            &mut (&mut source).take(self.left.saturating_add(meta.len()).saturating_add(1)),
            &mut made,
        )
        .map_err(io("copy", shown))?;
        if copied > meta.len() {
            self.charge(copied - meta.len(), shown)?;
        }
        keep_metadata(&made, meta, target)
    }

    fn copy_dir(&mut self, dir: &File, shown: &Path, target: &Path) -> Result<(), ImageError> {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(target)
            .map_err(io("create", target))?;
        let at = fd_path(dir);
        for entry in std::fs::read_dir(&at).map_err(io("read", shown))? {
            let name = entry.map_err(io("read", shown))?.file_name();
            let (path, shown, target) = (at.join(&name), shown.join(&name), target.join(&name));
            let (file, meta) = open_path(&path).map_err(io("open", &shown))?;
            if meta.is_dir() || meta.is_file() {
                self.copy(&file, &meta, &shown, &target)?;
            } else if meta.file_type().is_symlink() {
                // Read through the directory's fd: the link itself, not where it points.
                let link = std::fs::read_link(&path).map_err(io("read", &shown))?;
                std::os::unix::fs::symlink(&link, &target).map_err(io("create", &target))?;
                ignore_eperm(std::os::unix::fs::lchown(
                    &target,
                    Some(meta.uid()),
                    Some(meta.gid()),
                ))
                .map_err(io("chown", &target))?;
            } else {
                tracing::warn!(
                    mount = %self.destination.display(),
                    "not copied into the microVM: {} is a {}",
                    shown.display(),
                    kind(&meta)
                );
            }
        }
        Ok(())
    }
}

/// A chown that is not ours to make (an unprivileged runtime) keeps our own ids, as `cp -a`.
fn ignore_eperm(result: std::io::Result<()>) -> std::io::Result<()> {
    match result {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
        other => other,
    }
}

/// Owner, then mode (a chown clears set-id bits), then times, as the source had them.
fn keep_metadata(made: &File, meta: &Metadata, target: &Path) -> Result<(), ImageError> {
    ignore_eperm(std::os::unix::fs::fchown(
        made,
        Some(meta.uid()),
        Some(meta.gid()),
    ))
    .map_err(io("chown", target))?;
    made.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(io("chmod", target))?;
    let mut times = std::fs::FileTimes::new();
    if let Ok(accessed) = meta.accessed() {
        times = times.set_accessed(accessed);
    }
    if let Ok(modified) = meta.modified() {
        times = times.set_modified(modified);
    }
    made.set_times(times)
        .map_err(io("set the times of", target))
}

/// Rewrites `spec`'s host bind mounts and copies their sources under `staging`, at most
/// `limit` bytes of them. Returns whether anything was copied (and so an image of `staging`
/// is needed).
pub fn stage(spec: &mut Spec, id: &str, staging: &Path, limit: u64) -> Result<bool, ImageError> {
    let Some(mounts) = spec.mounts().clone() else {
        return Ok(false);
    };
    let guest_dir = PathBuf::from(host_files_dir(id));
    let mut copied = 0;
    let mut left = limit;
    let mut rewritten = Vec::with_capacity(mounts.len());
    for mut mount in mounts {
        let source = mount.source().clone().filter(|s| s.is_absolute());
        match source {
            Some(_) if is_bind(&mount) && mount.destination() == Path::new("/dev/shm") => {
                mount = shm()
            }
            Some(source) if is_bind(&mount) && !guest_own(&source) => {
                // A source that does not exist is left to fail in the guest, as runc's would.
                let Ok(resolved) = std::fs::canonicalize(&source) else {
                    rewritten.push(mount);
                    continue;
                };
                if guest_own(&resolved) {
                    // A link into /dev, /proc or /sys: the guest's own, never opened here.
                    mount.set_source(Some(resolved));
                    rewritten.push(mount);
                    continue;
                }
                if copied == 0 {
                    // The image's root: open as it always was in the guest, where mounts made
                    // in a container's user namespace look up their sources through it (on
                    // the host it sits in the container's 0700 directory).
                    std::fs::DirBuilder::new()
                        .mode(0o755)
                        .create(staging)
                        .and_then(|()| {
                            std::fs::set_permissions(
                                staging,
                                std::fs::Permissions::from_mode(0o755),
                            )
                        })
                        .map_err(io("create", staging))?;
                }
                let name = copied.to_string();
                let destination = mount.destination().clone();
                let mut copier = Copier {
                    destination: &destination,
                    left,
                    limit,
                };
                copier.copy_source(&resolved, &staging.join(&name))?;
                left = copier.left;
                mount.set_source(Some(guest_dir.join(&name)));
                copied += 1;
            }
            _ => {}
        }
        rewritten.push(mount);
    }
    spec.set_mounts(Some(rewritten));
    Ok(copied > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_binds_are_copied_and_guest_paths_left_alone() {
        let dir = std::env::temp_dir().join(format!("cocoon-host-files-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("vol")).unwrap();
        std::fs::write(dir.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        std::fs::write(dir.join("vol/data"), "x").unwrap();
        let json = serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": dir.join("hosts"), "options": ["rbind", "ro"]},
                {"destination": "/data", "type": "none", "source": dir.join("vol"), "options": ["bind"]},
                {"destination": "/dev/shm", "type": "bind", "source": dir.join("shm"), "options": ["bind"]},
                {"destination": "/guest-proc", "type": "bind", "source": "/proc", "options": ["rbind"]}
            ]
        });
        let mut spec: Spec = serde_json::from_value(json).unwrap();
        let staging = dir.join("staging");
        assert!(stage(&mut spec, "c1", &staging, 1 << 20).unwrap());
        let mounts = spec.mounts().as_ref().unwrap();
        let source = |i: usize| mounts[i].source().clone().unwrap();
        assert_eq!(source(0), Path::new("proc"));
        assert_eq!(source(1), Path::new("/run/cocoon/containers/c1/host/0"));
        assert_eq!(source(2), Path::new("/run/cocoon/containers/c1/host/1"));
        assert_eq!(mounts[3].typ().as_deref(), Some("tmpfs"));
        assert_eq!(source(4), Path::new("/proc"));
        assert_eq!(
            std::fs::read_to_string(staging.join("0")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        assert_eq!(
            std::fs::read_to_string(staging.join("1/data")).unwrap(),
            "x"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn bind(destination: &str, source: &Path) -> serde_json::Value {
        serde_json::json!({"destination": destination, "type": "bind", "source": source, "options": ["rbind"]})
    }

    fn spec_of(mounts: Vec<serde_json::Value>) -> Spec {
        serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "mounts": mounts}))
            .unwrap()
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cocoon-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }

    /// `stage` in a thread: a copy that opened a FIFO would wait forever, and so fails here.
    fn stage_within(spec: Spec, staging: PathBuf, limit: u64) -> (Result<bool, ImageError>, Spec) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut spec = spec;
            let result = stage(&mut spec, "c1", &staging, limit);
            let _ = tx.send((result, spec));
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("stage waited on a special file")
    }

    #[test]
    fn special_sources_are_refused_without_being_opened() {
        let dir = scratch("host-special");
        mkfifo(&dir.join("fifo"));
        let _socket = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
        std::os::unix::fs::symlink(dir.join("fifo"), dir.join("to-fifo")).unwrap();
        for (source, kind) in [("fifo", "FIFO"), ("sock", "socket"), ("to-fifo", "FIFO")] {
            let spec = spec_of(vec![bind("/run/x", &dir.join(source))]);
            let (result, _) = stage_within(spec, dir.join(format!("staging-{source}")), 1 << 20);
            let error = result.unwrap_err();
            let text = error.to_string();
            assert!(
                matches!(error, ImageError::HostFileKind { kind: k, .. } if k == kind),
                "{source}: {text}"
            );
            assert!(text.contains("mount /run/x"), "{text}");
        }
        // A link into /dev is the guest's /dev: the host's device is not copied, nor opened.
        std::os::unix::fs::symlink("/dev/null", dir.join("to-null")).unwrap();
        let spec = spec_of(vec![bind("/x", &dir.join("to-null"))]);
        let (result, spec) = stage_within(spec, dir.join("staging-null"), 1 << 20);
        assert!(!result.unwrap());
        let source = spec.mounts().as_ref().unwrap()[0].source().clone();
        assert_eq!(source.as_deref(), Some(Path::new("/dev/null")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn directories_are_copied_with_their_files_and_links_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("host-tree");
        let vol = dir.join("vol");
        std::fs::create_dir_all(vol.join("sub")).unwrap();
        std::fs::write(vol.join("sub/data"), "x").unwrap();
        std::fs::set_permissions(vol.join("sub/data"), std::fs::Permissions::from_mode(0o751))
            .unwrap();
        std::fs::set_permissions(vol.join("sub"), std::fs::Permissions::from_mode(0o555)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", vol.join("abs")).unwrap();
        std::os::unix::fs::symlink("sub/data", vol.join("rel")).unwrap();
        mkfifo(&vol.join("fifo"));
        let _socket = std::os::unix::net::UnixListener::bind(vol.join("sock")).unwrap();
        // The mount's source is itself a link: what it points to is copied.
        std::os::unix::fs::symlink(&vol, dir.join("link-to-vol")).unwrap();
        let staging = dir.join("staging");
        let spec = spec_of(vec![bind("/data", &dir.join("link-to-vol"))]);
        let (result, _) = stage_within(spec, staging.clone(), 1 << 20);
        assert!(result.unwrap());
        let copy = staging.join("0");
        assert_eq!(std::fs::read_to_string(copy.join("sub/data")).unwrap(), "x");
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&copy.join("sub/data")), 0o751);
        assert_eq!(mode(&copy.join("sub")), 0o555);
        assert_eq!(
            std::fs::read_link(copy.join("abs")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(
            std::fs::read_link(copy.join("rel")).unwrap(),
            Path::new("sub/data")
        );
        assert!(!copy.join("fifo").exists() && !copy.join("sock").exists());
        std::fs::set_permissions(copy.join("sub"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(vol.join("sub"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_copy_is_bounded_and_the_error_names_the_mount() {
        let dir = scratch("host-limit");
        std::fs::write(dir.join("a"), vec![0u8; 600]).unwrap();
        std::fs::create_dir(dir.join("b")).unwrap();
        std::fs::write(dir.join("b/big"), vec![0u8; 600]).unwrap();
        let mounts = vec![bind("/a", &dir.join("a")), bind("/b", &dir.join("b"))];
        let (result, _) = stage_within(spec_of(mounts.clone()), dir.join("s1"), 1000);
        let error = result.unwrap_err();
        assert!(
            matches!(&error, ImageError::HostFilesTooLarge { destination, .. } if destination == Path::new("/b")),
            "{error}"
        );
        assert!(error.to_string().contains("/b/big"), "{error}");
        let (result, _) = stage_within(spec_of(mounts), dir.join("s2"), 1200);
        assert!(result.unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
