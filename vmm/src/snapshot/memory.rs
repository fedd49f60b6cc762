//! Guest RAM in a snapshot: one file, the RAM regions one after another at the offsets the state
//! records. Saving writes only the pages the guest has touched (a sparse file: untouched RAM
//! costs neither time nor disk). Restoring maps the file `MAP_PRIVATE`: nothing is read up
//! front, pages come in on first touch, and every VM restored from the same file shares the
//! page cache's copy of each page until it writes to it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

pub const MEMORY_FILE: &str = "memory.bin";

const PAGE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot write guest memory to {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the memory file {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the memory file {path} has {have} bytes, the snapshot's RAM needs {want}")]
    Size {
        path: std::path::PathBuf,
        have: u64,
        want: u64,
    },
    #[error("the snapshot's memory layout is invalid: {0}")]
    Layout(String),
    #[error("cannot map the memory file: {0}")]
    Map(String),
}

/// Which pages of `len` bytes at `addr` are resident: one flag per page.
fn resident(addr: *mut u8, len: usize) -> std::io::Result<Vec<u8>> {
    let mut flags = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: `addr` and `len` describe a live mapping owned by guest memory (page aligned, as
    // mmap returned it); mincore writes one byte per page into `flags`, which has that many.
    let rc = unsafe { libc::mincore(addr.cast(), len, flags.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(flags)
}

/// Writes guest RAM to `dir/memory.bin` and returns its layout. With `all_pages`, every page is
/// written (RAM that is itself mapped from a file, whose untouched pages are not resident but
/// are not zero either); otherwise the pages in `file_mapped` (host ranges mapped from the boot
/// files, whose residency says only what the page cache holds) and every resident page, the
/// rest left as holes.
pub fn save(
    mem: &GuestMemoryMmap,
    dir: &Path,
    all_pages: bool,
    file_mapped: &[(usize, usize)],
) -> Result<Vec<RegionLayout>, MemoryError> {
    let path = dir.join(MEMORY_FILE);
    let write_err = |source| MemoryError::Write {
        path: path.clone(),
        source,
    };
    let file = File::create(&path).map_err(write_err)?;
    let mut layout = Vec::new();
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = region.as_ptr();
        layout.push(RegionLayout {
            guest_addr: region.start_addr().0,
            size: len as u64,
            file_offset: offset,
        });
        let mut flags = if all_pages {
            vec![1u8; len.div_ceil(PAGE)]
        } else {
            resident(host, len).map_err(write_err)?
        };
        mark_file_mapped(&mut flags, host as usize, len, file_mapped);
        let mut page = 0;
        while page < flags.len() {
            if flags[page] & 1 == 0 {
                page += 1;
                continue;
            }
            let start = page;
            while page < flags.len() && flags[page] & 1 != 0 {
                page += 1;
            }
            let from = start * PAGE;
            let to = (page * PAGE).min(len);
            // SAFETY: [from, to) lies inside the region's live mapping; the VM is paused, so
            // nothing writes the pages while we read them.
            let bytes = unsafe { std::slice::from_raw_parts(host.add(from), to - from) };
            file.write_all_at(bytes, offset + from as u64)
                .map_err(write_err)?;
        }
        offset += len as u64;
    }
    file.set_len(offset).map_err(write_err)?;
    Ok(layout)
}

/// Marks the pages of the region at `base` (`len` bytes) that `file_mapped` ranges cover.
fn mark_file_mapped(flags: &mut [u8], base: usize, len: usize, file_mapped: &[(usize, usize)]) {
    for &(start, size) in file_mapped {
        let from = start.max(base);
        let to = start.saturating_add(size).min(base + len);
        if from >= to {
            continue;
        }
        let pages = (from - base) / PAGE..(to - base).div_ceil(PAGE);
        for flag in &mut flags[pages] {
            *flag = 1;
        }
    }
}

/// Maps `dir/memory.bin` as guest RAM with the given layout, privately (copy on write).
pub fn map(dir: &Path, layout: &[RegionLayout]) -> Result<GuestMemoryMmap, MemoryError> {
    let path = dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(|source| MemoryError::Open {
        path: path.clone(),
        source,
    })?;
    let have = file
        .metadata()
        .map_err(|source| MemoryError::Open {
            path: path.clone(),
            source,
        })?
        .len();
    let mut want = 0u64;
    let mut regions = Vec::with_capacity(layout.len());
    for r in layout {
        let end = r
            .file_offset
            .checked_add(r.size)
            .ok_or_else(|| MemoryError::Layout("a region's end overflows".into()))?;
        if r.size == 0 || r.size % PAGE as u64 != 0 || r.file_offset % PAGE as u64 != 0 {
            return Err(MemoryError::Layout(format!(
                "region at {:#x} is not page aligned",
                r.guest_addr
            )));
        }
        want = want.max(end);
        let size =
            usize::try_from(r.size).map_err(|_| MemoryError::Layout("region too large".into()))?;
        let file = file.try_clone().map_err(|source| MemoryError::Open {
            path: path.clone(),
            source,
        })?;
        let mapping = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(file, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        let region =
            GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or_else(|| {
                MemoryError::Layout(format!("region at {:#x} overflows", r.guest_addr))
            })?;
        regions.push(region);
    }
    if have < want {
        return Err(MemoryError::Size { path, have, want });
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Layout(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("cocoon-mem-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn touched_pages_come_back_and_the_file_is_sparse() {
        let dir = scratch("roundtrip");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 2 << 20),
        ])
        .unwrap();
        mem.write_slice(b"low", GuestAddress(0x1234)).unwrap();
        mem.write_slice(b"high", GuestAddress((1 << 32) + 0x10_0000))
            .unwrap();
        let layout = save(&mem, &dir, false, &[]).unwrap();
        assert_eq!(layout.len(), 2);
        assert_eq!(layout[1].file_offset, 1 << 20);
        let meta = std::fs::metadata(dir.join(MEMORY_FILE)).unwrap();
        assert_eq!(meta.len(), 3 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "untouched RAM is not written"
        );

        let back = map(&dir, &layout).unwrap();
        let mut buf = [0u8; 4];
        back.read_slice(&mut buf[..3], GuestAddress(0x1234))
            .unwrap();
        assert_eq!(&buf[..3], b"low");
        back.read_slice(&mut buf, GuestAddress((1 << 32) + 0x10_0000))
            .unwrap();
        assert_eq!(&buf, b"high");
        // Private: the clone's writes never reach the file another clone maps.
        back.write_slice(b"mine", GuestAddress(0x1234)).unwrap();
        let other = map(&dir, &layout).unwrap();
        other
            .read_slice(&mut buf[..3], GuestAddress(0x1234))
            .unwrap();
        assert_eq!(&buf[..3], b"low");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pages_mapped_from_boot_files_are_saved_even_when_not_resident() {
        let mut flags = vec![0u8; 8];
        let base = 0x10_0000;
        // Two ranges: one inside, one hanging over the region's end, one elsewhere.
        mark_file_mapped(
            &mut flags,
            base,
            8 * PAGE,
            &[
                (base + PAGE, 2 * PAGE),
                (base + 7 * PAGE, 4 * PAGE),
                (0x9000_0000, PAGE),
            ],
        );
        assert_eq!(flags, [0, 1, 1, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn a_short_or_misaligned_file_is_refused() {
        let dir = scratch("short");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let layout = save(&mem, &dir, true, &[]).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(MEMORY_FILE))
            .unwrap();
        f.set_len(4096).unwrap();
        assert!(matches!(map(&dir, &layout), Err(MemoryError::Size { .. })));
        let mut bad = layout.clone();
        bad[0].file_offset = 7;
        assert!(matches!(map(&dir, &bad), Err(MemoryError::Layout(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
