//! A boot image file (the kernel, the initramfs) as it is read into guest memory.
//!
//! Where the file offset and the guest address are both page aligned, whole pages are not
//! copied but mapped from the file, private and copy-on-write, over the guest RAM they would
//! have been copied to. Loading a 10 MB vmlinux then costs a few mmap calls instead of
//! thousands of page faults and a copy, and every VM booting the same image shares its
//! unwritten pages (most of the kernel's text) through the page cache. What remains (a
//! partial last page, unaligned data) is copied as usual. linux-loader reads the kernel
//! through this type, unaware of the difference.
//!
//! An image must not be rewritten in place while VMs use it (replace it with a rename, as
//! `guest-kernel/build.sh` does): the mapped pages follow the file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

const PAGE_SIZE: u64 = 4096;

pub struct BootImage {
    file: File,
    pos: u64,
    len: u64,
    mapped_bytes: u64,
    /// Host ranges `(address, length)` now mapped from the file.
    mapped: Vec<(usize, usize)>,
}

impl BootImage {
    pub fn new(file: File) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(BootImage {
            file,
            pos: 0,
            len,
            mapped_bytes: 0,
            mapped: Vec::new(),
        })
    }

    /// Size of the file in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many bytes were mapped instead of copied.
    pub fn mapped_bytes(&self) -> u64 {
        self.mapped_bytes
    }

    /// The host ranges of guest RAM mapped from the file. Their pages hold the file's bytes
    /// whether or not the guest touched them, and are resident only as far as the host's page
    /// cache happens to hold the file: a snapshot must save them whole.
    pub fn mapped_ranges(&self) -> &[(usize, usize)] {
        &self.mapped
    }

    /// Maps the whole pages of the next `want` bytes at `dst`, if alignment allows.
    fn try_map(&mut self, dst: *mut u8, want: u64) -> Option<u64> {
        let whole = want.min(self.len.saturating_sub(self.pos)) & !(PAGE_SIZE - 1);
        if whole == 0
            || !(dst as u64).is_multiple_of(PAGE_SIZE)
            || !self.pos.is_multiple_of(PAGE_SIZE)
        {
            return None;
        }
        // SAFETY: `dst..dst + whole` lies inside the VolatileSlice linux-loader handed us, which
        // is guest RAM this process mapped and owns; no vCPU runs yet, so nothing else uses
        // those pages. MAP_FIXED replaces them with a private view of the file of the same
        // size, so the guest memory mapping keeps its extent and is unmapped whole later.
        let mapped = unsafe {
            libc::mmap(
                dst.cast(),
                whole as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                self.file.as_raw_fd(),
                self.pos as libc::off_t,
            )
        };
        if mapped == libc::MAP_FAILED {
            return None;
        }
        self.pos += whole;
        self.mapped_bytes += whole;
        self.mapped.push((dst as usize, whole as usize));
        Some(whole)
    }
}

impl Read for BootImage {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for BootImage {
    fn seek(&mut self, from: SeekFrom) -> std::io::Result<u64> {
        let target = match from {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target
            .ok_or_else(|| std::io::Error::other("seek before the start of the boot image"))?;
        Ok(self.pos)
    }
}

/// Fills as much of `buf` as the file has left in one call, as `read_exact_volatile_from` needs:
/// whole pages mapped where alignment allows, the rest copied.
impl ReadVolatile for BootImage {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let mapped = {
            let guard = buf.ptr_guard_mut();
            self.try_map(guard.as_ptr(), buf.len() as u64).unwrap_or(0) as usize
        };
        let mut rest = buf.offset(mapped)?;
        let mut done = mapped;
        while !rest.is_empty() {
            self.file
                .seek(SeekFrom::Start(self.pos))
                .map_err(VolatileMemoryError::IOError)?;
            let n = self.file.read_volatile(&mut rest)?;
            if n == 0 {
                break;
            }
            self.pos += n as u64;
            done += n;
            rest = rest.offset(n)?;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// An unlinked file holding `content` (`name` keeps concurrent tests apart).
    fn image(name: &str, content: &[u8]) -> File {
        let path =
            std::env::temp_dir().join(format!("cocoon-bootimg-{name}-{}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(content)
            .unwrap();
        let f = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn aligned_pages_are_mapped_and_the_tail_is_copied() {
        let content: Vec<u8> = (0..3 * PAGE_SIZE as usize + 100)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut img = BootImage::new(image("aligned", &content)).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x1_0000), &mut img, content.len())
            .unwrap();
        assert_eq!(img.mapped_bytes(), 3 * PAGE_SIZE);
        let mut back = vec![0u8; content.len()];
        mem.read_slice(&mut back, GuestAddress(0x1_0000)).unwrap();
        assert_eq!(back, content);
        // Writes go to the guest's private copy, never to the file.
        mem.write_slice(&[0xee; 8], GuestAddress(0x1_0000)).unwrap();
        let mut head = [0u8; 8];
        img.file.read_exact_at(&mut head, 0).unwrap();
        assert_eq!(head, content[..8]);
    }

    #[test]
    fn unaligned_reads_are_copied() {
        let content: Vec<u8> = (0..2 * PAGE_SIZE as usize)
            .map(|i| (i % 13) as u8)
            .collect();
        let mut img = BootImage::new(image("unaligned", &content)).unwrap();
        img.seek(SeekFrom::Start(10)).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x2_0000), &mut img, PAGE_SIZE as usize)
            .unwrap();
        assert_eq!(img.mapped_bytes(), 0);
        let mut back = vec![0u8; PAGE_SIZE as usize];
        mem.read_slice(&mut back, GuestAddress(0x2_0000)).unwrap();
        assert_eq!(back, content[10..10 + PAGE_SIZE as usize]);
        assert!(img.seek(SeekFrom::Current(-1_000_000)).is_err());
    }
}
