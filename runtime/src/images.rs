//! The bundle's root filesystem as read-only EROFS block images for the VM.
//!
//! When the rootfs is an overlay mount (how Podman and containerd hand it over), each lower
//! layer becomes its own image in a cache shared by all containers, keyed by the layer
//! directory's identity, and only the upper layer is imaged per container. Otherwise the
//! directory becomes one image. Images are written under a temporary name and renamed into
//! place, so a crashed or concurrent build never leaves a half-written entry behind.
//!
//! An image holds every file of its layer, so images are 0600 and the cache directory 0700:
//! only root reads them, as only root reads the layers the engine unpacked.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cocoon_agent_protocol::boot_check::Fnv1a64;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mkfs.erofs failed for {dir}: {message}")]
    Mkfs { dir: PathBuf, message: String },
}

pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Io { what, path, source }
}

/// One image the VM gets as a read-only disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub image: PathBuf,
    /// Whether the image belongs to this container (removed with it) or to the shared cache.
    pub owned: bool,
}

/// The layers of an overlay mount, lowest first, then the upper directory.
#[derive(Debug, PartialEq, Eq)]
pub struct Overlay {
    pub lower: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The overlay mounted at `dir`, from the text of /proc/self/mountinfo.
pub fn find_overlay(mountinfo: &str, dir: &Path) -> Option<Overlay> {
    // The last mount at a path is the one visible there.
    let line = mountinfo.lines().rev().find(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        fields
            .get(4)
            .is_some_and(|m| Path::new(&unescape(m)) == dir)
    })?;
    let (_, after) = line.split_once(" - ")?;
    let mut parts = after.split(' ');
    if parts.next()? != "overlay" {
        return None;
    }
    let options = parts.nth(1)?;
    let mut lower = Vec::new();
    let mut upper = None;
    for option in options.split(',') {
        if let Some(list) = option.strip_prefix("lowerdir=") {
            // overlayfs lists the top layer first.
            lower = list
                .split(':')
                .rev()
                .map(|p| PathBuf::from(unescape(p)))
                .collect();
        } else if let Some(path) = option.strip_prefix("upperdir=") {
            upper = Some(PathBuf::from(unescape(path)));
        }
    }
    (!lower.is_empty()).then_some(Overlay { lower, upper })
}

/// Builds `dir` into an EROFS image at `image` (0600), via a temporary file and a rename.
pub fn build_image(dir: &Path, image: &Path) -> Result<(), ImageError> {
    let tmp = crate::state::temp_path(image);
    // Made here, 0600 and with O_EXCL, so that mkfs.erofs writes into our file and not
    // through anything planted at the name; it keeps an existing file's mode.
    let file = crate::state::create_new_file(&tmp, 0o600).map_err(io("create", &tmp))?;
    let built = run_mkfs(dir, &tmp)
        .and_then(|()| file.sync_all().map_err(io("write", &tmp)))
        .and_then(|()| std::fs::rename(&tmp, image).map_err(io("rename", image)));
    if built.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    built?;
    crate::state::sync_parent(image).map_err(io("sync the directory of", image))
}

fn run_mkfs(dir: &Path, image: &Path) -> Result<(), ImageError> {
    let output = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg("-T0")
        // Paths are never options, whatever they start with.
        .arg("--")
        .arg(image)
        .arg(dir)
        .output()
        .map_err(io("run mkfs.erofs for", dir))?;
    if !output.status.success() {
        return Err(ImageError::Mkfs {
            dir: dir.to_owned(),
            message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Builds each `(dir, image)` pair, several at a time: mkfs.erofs of a big layer is bound by
/// one core and by reading the layer's files, so a new image's layers build side by side.
fn build_images(pairs: &[(&Path, PathBuf)]) -> Result<(), ImageError> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    for batch in pairs.chunks(workers.max(1)) {
        let results: Vec<Result<(), ImageError>> = std::thread::scope(|scope| {
            let running: Vec<_> = batch
                .iter()
                .map(|(dir, image)| scope.spawn(move || build_image(dir, image)))
                .collect();
            running
                .into_iter()
                .zip(batch)
                .map(|(t, (dir, _))| {
                    t.join().unwrap_or_else(|_| {
                        Err(ImageError::Mkfs {
                            dir: dir.to_path_buf(),
                            message: "the image builder thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        results.into_iter().collect::<Result<(), ImageError>>()?;
    }
    Ok(())
}

/// A cache key for a layer directory: its canonical path and the identity of its inode. A
/// layer that is deleted and recreated at the same path gets a new inode or ctime, so a new key.
fn layer_key(dir: &Path) -> Result<String, ImageError> {
    let canonical = std::fs::canonicalize(dir).map_err(io("resolve layer", dir))?;
    let meta = std::fs::metadata(&canonical).map_err(io("stat layer", &canonical))?;
    let mut hash = Fnv1a64::default();
    hash.update(canonical.as_os_str().as_encoded_bytes());
    for n in [
        meta.dev(),
        meta.ino(),
        meta.ctime() as u64,
        meta.ctime_nsec() as u64,
    ] {
        hash.update(&n.to_le_bytes());
    }
    Ok(format!("{:016x}", hash.finish()))
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none())
}

/// The overlay mounted at `rootfs`, if it is one.
fn overlay_at(rootfs: &Path) -> Option<Overlay> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    find_overlay(&mountinfo, rootfs)
}

/// How many images [`images_for`] makes of `overlay` (`None`: a plain directory).
fn count(overlay: Option<&Overlay>) -> usize {
    match overlay {
        None => 1,
        Some(overlay) => {
            overlay.lower.len()
                + usize::from(overlay.upper.as_deref().is_some_and(|u| !is_empty_dir(u)))
        }
    }
}

/// How many images `rootfs` needs, each a disk of the VM, found without building any.
pub fn image_count(rootfs: &Path) -> usize {
    count(overlay_at(rootfs).as_ref())
}

/// The images for `rootfs`, lowest first: cached layer images plus the upper layer's image
/// when the rootfs is an overlay, else one image of the directory at `own_dir/rootfs.erofs`.
pub fn images_for(rootfs: &Path, cache: &Path, own_dir: &Path) -> Result<Vec<Layer>, ImageError> {
    let Some(overlay) = overlay_at(rootfs) else {
        let image = own_dir.join("rootfs.erofs");
        build_image(rootfs, &image)?;
        return Ok(vec![Layer { image, owned: true }]);
    };
    crate::state::private_shared_dir(cache).map_err(io("create", cache))?;
    let mut layers = Vec::new();
    let mut missing = Vec::new();
    for lower in &overlay.lower {
        let image = cache.join(format!("{}.erofs", layer_key(lower)?));
        if !image.exists() {
            missing.push((lower.as_path(), image.clone()));
        } else if let Err(e) = crate::layer_cache::touch(&image) {
            // Only its age is wrong: it goes a collection early if no VM holds it.
            tracing::warn!("{e}");
        }
        layers.push(Layer {
            image,
            owned: false,
        });
    }
    build_images(&missing)?;
    if let Some(upper) = overlay.upper.filter(|u| !is_empty_dir(u)) {
        let image = own_dir.join("upper.erofs");
        build_image(&upper, &image)?;
        layers.push(Layer { image, owned: true });
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
90 22 0:50 / /var/lib/containers/storage/overlay/abc/merged rw,nodev,relatime - overlay overlay rw,lowerdir=/var/lib/containers/storage/overlay/l/TOP:/var/lib/containers/storage/overlay/l/BASE,upperdir=/var/lib/containers/storage/overlay/abc/diff,workdir=/var/lib/containers/storage/overlay/abc/work
91 22 0:51 / /run/with\\040space rw - overlay overlay rw,lowerdir=/l\\040a,upperdir=/u,workdir=/w
";

    #[test]
    fn overlay_layers_come_out_lowest_first() {
        let overlay = find_overlay(
            MOUNTINFO,
            Path::new("/var/lib/containers/storage/overlay/abc/merged"),
        )
        .unwrap();
        assert_eq!(
            overlay.lower,
            [
                PathBuf::from("/var/lib/containers/storage/overlay/l/BASE"),
                PathBuf::from("/var/lib/containers/storage/overlay/l/TOP")
            ]
        );
        assert_eq!(
            overlay.upper,
            Some(PathBuf::from(
                "/var/lib/containers/storage/overlay/abc/diff"
            ))
        );
    }

    #[test]
    fn escaped_paths_and_non_overlays() {
        let overlay = find_overlay(MOUNTINFO, Path::new("/run/with space")).unwrap();
        assert_eq!(overlay.lower, [PathBuf::from("/l a")]);
        assert_eq!(find_overlay(MOUNTINFO, Path::new("/")), None);
        assert_eq!(find_overlay(MOUNTINFO, Path::new("/elsewhere")), None);
    }

    #[test]
    fn images_are_counted_before_any_is_built() {
        let dir = std::env::temp_dir().join(format!("cocoon-count-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("upper")).unwrap();
        let overlay = |upper: bool| Overlay {
            lower: vec!["/l1".into(), "/l2".into(), "/l3".into()],
            upper: upper.then(|| dir.join("upper")),
        };
        assert_eq!(count(None), 1);
        assert_eq!(count(Some(&overlay(false))), 3);
        // An empty upper layer needs no image; one with a file does.
        assert_eq!(count(Some(&overlay(true))), 3);
        std::fs::write(dir.join("upper/f"), "x").unwrap();
        assert_eq!(count(Some(&overlay(true))), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn images_are_private() {
        use std::os::unix::fs::PermissionsExt;
        if Command::new("mkfs.erofs").arg("--help").output().is_err() {
            eprintln!("SKIPPED: no mkfs.erofs");
            return;
        }
        let dir = std::env::temp_dir().join(format!("cocoon-image-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("tree")).unwrap();
        std::fs::write(dir.join("tree/f"), "x").unwrap();
        let image = dir.join("out.erofs");
        build_image(&dir.join("tree"), &image).unwrap();
        let mode = std::fs::metadata(&image).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn layer_keys_change_when_the_layer_is_recreated() {
        let dir = std::env::temp_dir().join(format!("cocoon-layer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = layer_key(&dir).unwrap();
        assert_eq!(first, layer_key(&dir).unwrap());
        std::fs::remove_dir(&dir).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::create_dir_all(&dir).unwrap();
        assert_ne!(first, layer_key(&dir).unwrap());
        std::fs::remove_dir(&dir).unwrap();
    }
}
