//! Legacy PC devices on port I/O: the 8250 serial port and the i8042 reset line.

pub mod i8042;
pub mod persist;
pub mod serial;
