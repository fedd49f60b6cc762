//! The PVH boot protocol: the `hvm_start_info` block a PVH kernel reads at entry (pointed to by
//! `ebx`), its memory map and its module list (the initramfs).

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START};
use super::memory_map::E820Entry;

/// `hvm_start_info.magic`: "xEn3" with the high bit set, as the PVH spec defines it.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;

#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    #[error("the memory map has {0} entries, more than the {PVH_MEMMAP_MAX_ENTRIES} that fit")]
    TooManyMemmapEntries(usize),
    #[error("cannot write the PVH {what} to guest memory at {addr:#x}: {source}")]
    Write {
        what: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// Where the initramfs was loaded.
#[derive(Debug, Clone, Copy)]
pub struct Initrd {
    pub addr: u64,
    pub size: u64,
}

/// Builds the start info block in guest memory and returns its address (the `ebx` at entry).
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    cmdline_addr: u64,
    initrd: Option<Initrd>,
    e820: &[E820Entry],
) -> Result<u64, PvhError> {
    if e820.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(PvhError::TooManyMemmapEntries(e820.len()));
    }
    let write = |what, addr: u64, res: Result<(), vm_memory::GuestMemoryError>| {
        res.map_err(|source| PvhError::Write { what, addr, source })
    };

    for (i, entry) in e820.iter().enumerate() {
        let addr = PVH_MEMMAP_START + (i * size_of::<hvm_memmap_table_entry>()) as u64;
        let raw = hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind,
            reserved: 0,
        };
        write("memory map", addr, mem.write_obj(raw, GuestAddress(addr)))?;
    }

    let mut info = hvm_start_info {
        magic: START_INFO_MAGIC,
        version: 1,
        cmdline_paddr: cmdline_addr,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        write(
            "module list",
            PVH_MODLIST_START,
            mem.write_obj(module, GuestAddress(PVH_MODLIST_START)),
        )?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    write(
        "start info",
        PVH_INFO_START,
        mem.write_obj(info, GuestAddress(PVH_INFO_START)),
    )?;
    Ok(PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::super::memory_map::e820_map;
    use super::*;

    fn guest(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn start_info_points_at_cmdline_memmap_and_initrd() {
        let mem = guest(64 << 20);
        let map = e820_map(64 << 20);
        let initrd = Initrd {
            addr: 0x300_0000,
            size: 0x1234,
        };
        let at = write_start_info(&mem, 0x20000, Some(initrd), &map).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(at)).unwrap();
        assert_eq!(info.magic, START_INFO_MAGIC);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, 0x20000);
        assert_eq!(info.memmap_entries as usize, map.len());
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x1234));
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(
                info.memmap_paddr + 24 * (map.len() as u64 - 1),
            ))
            .unwrap();
        assert_eq!((last.addr, last.size, last.type_), (1 << 20, 63 << 20, 1));
    }

    #[test]
    fn no_initrd_means_no_modules() {
        let mem = guest(64 << 20);
        write_start_info(&mem, 0x20000, None, &e820_map(64 << 20)).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
    }

    #[test]
    fn oversized_memory_map_is_refused() {
        let mem = guest(64 << 20);
        let map = vec![
            E820Entry {
                addr: 0,
                size: 1,
                kind: 1
            };
            PVH_MEMMAP_MAX_ENTRIES + 1
        ];
        assert!(matches!(
            write_start_info(&mem, 0, None, &map),
            Err(PvhError::TooManyMemmapEntries(_))
        ));
    }
}
