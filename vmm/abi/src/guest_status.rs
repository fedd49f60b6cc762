//! The guest status page: an MMIO page the VMM provides and the agent writes single bytes to.
//! It carries the few things the VMM must learn without any device driver: the boot marker and
//! the notice that the following machine reset is a clean power-off.

/// Guest physical address of the page (first page of the 32-bit MMIO gap).
pub const GUEST_STATUS_ADDR: u64 = 0xd000_0000;
/// Offset of the status byte inside the page.
pub const STATUS_OFFSET: u64 = 0;
/// "The agent is running": the end of boot, as the VMM times it.
pub const AGENT_UP: u8 = 1;
/// "The next reset is a clean power-off, not a crash."
pub const SHUTDOWN_FOLLOWS: u8 = 2;
