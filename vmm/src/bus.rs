//! Port-I/O and MMIO buses: which device answers a guest access at an address.
//!
//! An access that no device claims reads as all ones and its writes are dropped, as on real
//! hardware; the guest cannot make the VMM fail by probing.

use std::sync::{Arc, Mutex};

/// A device that answers guest reads and writes inside its window. `offset` is relative to the
/// window's base; `data` is the access (1, 2, 4 or 8 bytes).
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus window {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
    #[error("bus window at {0:#x} has zero length or wraps around")]
    BadWindow(u64),
}

struct Window {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping device windows.
#[derive(Default)]
pub struct Bus {
    windows: Vec<Window>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadWindow(base))?;
        if self
            .windows
            .iter()
            .any(|w| base < w.base + w.len && w.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        self.windows.push(Window { base, len, device });
        self.windows.sort_by_key(|w| w.base);
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Window, u64)> {
        let idx = self
            .windows
            .partition_point(|w| w.base <= addr)
            .checked_sub(1)?;
        let w = &self.windows[idx];
        let offset = addr - w.base;
        // The whole access must fall inside the window.
        (offset.checked_add(size as u64)? <= w.len).then_some((w, offset))
    }

    /// Dispatches a read; returns false (and fills `data` with ones) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((w, offset)) => {
                lock(&w.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((w, offset)) => {
                lock(&w.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device. A device whose lock was poisoned by a panicking thread is still used: the
/// process aborts on panic (release profile), so poisoning only happens in tests.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_right_device_with_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x100, a.clone()).unwrap();
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        let mut data = [0u8; 2];
        assert!(bus.read(0x1010, &mut data));
        assert_eq!(data, [0x10, 0x10]);
        assert!(bus.write(0x10fc, &[1, 2, 3, 4]));
        assert_eq!(a.lock().unwrap().last_write, Some((0xfc, vec![1, 2, 3, 4])));
    }

    #[test]
    fn unclaimed_and_straddling_accesses_read_ones() {
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x100, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        let mut data = [0u8; 4];
        assert!(!bus.read(0xfff, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(
            !bus.read(0x10fe, &mut data),
            "access crossing the window end"
        );
        assert!(!bus.write(u64::MAX - 1, &[0; 4]));
    }

    #[test]
    fn overlapping_and_empty_windows_are_refused() {
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x100, dev()).unwrap();
        assert_eq!(
            bus.insert(0x10ff, 1, dev()),
            Err(BusError::Overlap {
                base: 0x10ff,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(0xf00, 0x101, dev()),
            Err(BusError::Overlap {
                base: 0xf00,
                len: 0x101
            })
        );
        assert_eq!(
            bus.insert(0x2000, 0, dev()),
            Err(BusError::BadWindow(0x2000))
        );
        assert_eq!(
            bus.insert(u64::MAX, 2, dev()),
            Err(BusError::BadWindow(u64::MAX))
        );
        bus.insert(0x1100, 1, dev()).unwrap();
    }
}
