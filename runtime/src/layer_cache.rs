//! Collecting the layer cache that `images.rs` fills: an image no process holds open and no
//! container has used for `layer_cache_max_age_hours` is removed, and temporaries that a
//! crashed build left are swept. `cocoon gc` collects at once; `create` at most once an hour.
//!
//! "In use" is what the host's processes hold open: every VM opens its disks when it starts
//! and keeps them open, so a running or created container's layers are never taken, and an
//! image a later `create` finds is touched (its mtime) so the age counts from its last use. A
//! checkpoint names its images by path: restore it before its layers age out, or keep the age
//! above how long checkpoints are kept.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::images::{ImageError, io};

/// How often `create` collects the cache.
pub const COLLECT_EVERY: Duration = Duration::from_secs(3600);
/// A temporary that no process holds open and is older than this is a crashed build's.
const STALE_TEMPORARY: Duration = Duration::from_secs(600);
/// Its mtime says when `create` last collected the cache.
const STAMP: &str = ".collected";

/// What a collection did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub removed: Vec<PathBuf>,
    pub removed_bytes: u64,
    pub in_use: usize,
    pub recent: usize,
    pub temporaries: usize,
}

/// Collects `cache` as of `now`: see the module's comment.
pub fn collect(cache: &Path, max_age: Duration, now: SystemTime) -> Result<Collected, ImageError> {
    let mut collected = Collected::default();
    let entries = match std::fs::read_dir(cache) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(collected),
        Err(e) => return Err(io("read", cache)(e)),
    };
    let open = open_files_under(cache);
    for entry in entries {
        let entry = entry.map_err(io("read", cache))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let temporary = name.contains(".erofs.tmp.");
        if !temporary && !name.ends_with(".erofs") {
            continue; // the stamp, or something that is not ours
        }
        // lstat: a symlink planted in the cache is removed as itself, never followed.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue; // gone meanwhile
        };
        if open.contains(&path) {
            collected.in_use += 1;
            continue;
        }
        let age = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or_default();
        let limit = if temporary { STALE_TEMPORARY } else { max_age };
        if age < limit {
            collected.recent += 1;
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                if temporary {
                    collected.temporaries += 1;
                } else {
                    collected.removed_bytes += meta.len();
                    collected.removed.push(path);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove", &path)(e)),
        }
    }
    Ok(collected)
}

/// Collects `cache` unless that was done less than `COLLECT_EVERY` ago (by anyone: the stamp
/// is shared). Returns `None` when it was not time yet.
pub fn collect_if_due(cache: &Path, max_age: Duration) -> Result<Option<Collected>, ImageError> {
    // A cache not made yet (the first create on a host) has nothing to collect.
    if !cache.is_dir() {
        return Ok(None);
    }
    let stamp = cache.join(STAMP);
    let now = SystemTime::now();
    let last = std::fs::metadata(&stamp).and_then(|m| m.modified()).ok();
    if last.is_some_and(|t| now.duration_since(t).unwrap_or_default() < COLLECT_EVERY) {
        return Ok(None);
    }
    // The stamp first: two creates at once do not both collect.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&stamp)
        .map_err(io("create", &stamp))?;
    file.set_modified(now).map_err(io("touch", &stamp))?;
    collect(cache, max_age, now).map(Some)
}

/// Marks a cached image used now, so its age counts from here.
pub fn touch(image: &Path) -> Result<(), ImageError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(io("open", image))?;
    file.set_modified(SystemTime::now())
        .map_err(io("touch", image))
}

/// Every path under `dir` that some process on the host has open (`/proc/PID/fd`).
fn open_files_under(dir: &Path) -> HashSet<PathBuf> {
    let mut open = HashSet::new();
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return open;
    };
    for process in processes.flatten() {
        let name = process.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue; // gone, or a kernel thread
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && target.starts_with(dir)
            {
                open.insert(target);
            }
        }
    }
    open
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, age: Duration) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, b"image").unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
        path
    }

    #[test]
    fn old_unused_images_and_stale_temporaries_go_the_rest_stays() {
        let dir = std::env::temp_dir().join(format!("cocoon-gc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let day = Duration::from_secs(86_400);
        let old = file(&dir, "aaaa.erofs", 3 * day);
        let held = file(&dir, "bbbb.erofs", 3 * day);
        let recent = file(&dir, "cccc.erofs", Duration::from_secs(60));
        let stale = file(&dir, "dddd.erofs.tmp.1.00", day);
        let building = file(&dir, "eeee.erofs.tmp.2.00", Duration::from_secs(10));
        let other = file(&dir, "notes.txt", 3 * day);
        // A VM holds its disks open, whatever their age.
        let _vm = std::fs::File::open(&held).unwrap();

        let collected = collect(&dir, day, SystemTime::now()).unwrap();
        assert_eq!(collected.removed, vec![old.clone()]);
        assert_eq!(collected.removed_bytes, 5);
        assert_eq!(
            (collected.in_use, collected.recent, collected.temporaries),
            (1, 2, 1)
        );
        assert!(!old.exists() && !stale.exists());
        assert!(held.exists() && recent.exists() && building.exists() && other.exists());

        // A touched image is young again.
        file(&dir, "ffff.erofs", 3 * day);
        touch(&dir.join("ffff.erofs")).unwrap();
        assert!(
            collect(&dir, day, SystemTime::now())
                .unwrap()
                .removed
                .is_empty()
        );

        // Due once, then not again within the hour.
        assert!(collect_if_due(&dir, day).unwrap().is_some());
        assert!(collect_if_due(&dir, day).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_cache_has_nothing_to_collect() {
        let dir = Path::new("/nonexistent/cocoon-layers");
        assert_eq!(
            collect(dir, Duration::ZERO, SystemTime::now()).unwrap(),
            Collected::default()
        );
    }
}
