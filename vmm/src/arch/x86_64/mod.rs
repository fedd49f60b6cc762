//! x86_64: guest physical layout, the memory map, PVH boot, MP table and vCPU registers.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod memory_map;
pub mod mptable;
pub mod msr;
pub mod pvh;
pub mod regs;
