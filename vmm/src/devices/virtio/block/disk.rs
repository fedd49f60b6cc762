//! The backing file of a virtio-blk device.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestMemoryMmap};

use super::request::{SECTOR_SHIFT, Segment, VIRTIO_BLK_ID_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {path} is in use by another VM (it is locked)")]
    Locked { path: PathBuf },
    #[error("disk image {0} is not a regular file or block device")]
    NotAFile(PathBuf),
}

/// An open raw image: its file, size in sectors, whether the guest may write, and the id GET_ID
/// reports (derived from the file's device and inode, so it is stable for the same image).
pub struct Disk {
    file: File,
    /// Absolute, so a snapshot taken here can reopen it from a process with another cwd.
    path: PathBuf,
    capacity: u64,
    read_only: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    dev: u64,
    ino: u64,
}

fn lock_mode(read_only: bool) -> libc::c_int {
    if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    }
}

/// `flock` without blocking; false when someone else holds a conflicting lock.
fn try_flock(file: &File, op: libc::c_int) -> bool {
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) == 0 }
}

impl Disk {
    /// Opens `path`. A writable image is locked exclusively (and a read-only one shared) so two
    /// VMs can never write the same image at once. An empty file is a disk of 0 sectors (a
    /// spare slot a later swap fills): every read and write to it fails.
    pub fn open(path: &Path, read_only: bool) -> Result<Disk, DiskError> {
        Self::open_with(path, read_only, None)
    }

    /// Opens `path` to take `current`'s place under a running guest. Reopening the very image
    /// `current` has (to see it grown, or to change ro/rw) would collide with our own lock, so
    /// for the same file `current`'s lock is let go while the new one is taken, and taken back
    /// when that fails.
    pub fn open_replacing(path: &Path, read_only: bool, current: &Disk) -> Result<Disk, DiskError> {
        Self::open_with(path, read_only, Some(current))
    }

    fn open_with(path: &Path, read_only: bool, current: Option<&Disk>) -> Result<Disk, DiskError> {
        let err = |source| DiskError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        if meta.is_dir() {
            return Err(DiskError::NotAFile(path.to_owned()));
        }
        let same = current.filter(|c| c.dev == meta.dev() && c.ino == meta.ino());
        if let Some(c) = same {
            try_flock(&c.file, libc::LOCK_UN);
        }
        if !try_flock(&file, lock_mode(read_only)) {
            if let Some(c) = same
                && !try_flock(&c.file, lock_mode(c.read_only))
            {
                tracing::warn!("disk image {}: lost its lock", c.path.display());
            }
            return Err(DiskError::Locked {
                path: path.to_owned(),
            });
        }
        let size = {
            let mut f = &file;
            f.seek(SeekFrom::End(0)).map_err(err)?
        };
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        let text = format!("cocoon{:x}{:x}", meta.dev(), meta.ino());
        let n = text.len().min(VIRTIO_BLK_ID_BYTES);
        id[..n].copy_from_slice(&text.as_bytes()[..n]);
        Ok(Disk {
            file,
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
            capacity: size >> SECTOR_SHIFT,
            read_only,
            id,
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// The image's path, made absolute when it was opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in 512-byte sectors (a partial last sector is not visible).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn id(&self) -> &[u8; VIRTIO_BLK_ID_BYTES] {
        &self.id
    }

    /// Reads from the image at `sector` into the guest buffers.
    pub fn read_into(
        &mut self,
        mem: &GuestMemoryMmap,
        sector: u64,
        data: &[Segment],
    ) -> std::io::Result<()> {
        self.transfer(sector, data, |file, seg| {
            mem.read_exact_volatile_from(seg.addr, file, seg.len as usize)
        })
    }

    /// Writes the guest buffers to the image at `sector`.
    pub fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        sector: u64,
        data: &[Segment],
    ) -> std::io::Result<()> {
        self.transfer(sector, data, |file, seg| {
            mem.write_all_volatile_to(seg.addr, file, seg.len as usize)
        })
    }

    /// Moves `data` between guest memory and the image at `sector`, one segment after another.
    fn transfer(
        &mut self,
        sector: u64,
        data: &[Segment],
        mut segment: impl FnMut(&mut File, &Segment) -> Result<(), vm_memory::GuestMemoryError>,
    ) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(sector << SECTOR_SHIFT))?;
        for seg in data {
            segment(&mut self.file, seg).map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        if self.read_only {
            Ok(())
        } else {
            self.file.sync_data()
        }
    }
}
