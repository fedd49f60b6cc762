//! Talking to the VMM without a driver: the guest status page (through /dev/mem) and the reset
//! line that ends the VM.

use std::os::fd::AsRawFd;

use cocoon_agent_protocol::guest_status::{
    AGENT_UP, GUEST_STATUS_ADDR, SHUTDOWN_FOLLOWS, STATUS_OFFSET,
};

fn write_status(value: u8) {
    if let Err(e) = write_status_page(value) {
        // Not under cocoon-vmm (e.g. another VMM): nothing listens, nothing is lost.
        crate::console::line(&format!(
            "cocoon-agent: cannot write guest status {value}: {e}"
        ));
    }
}

/// /dev/mem's read/write only reach RAM; an MMIO page must be mapped and stored to. The store
/// traps to the VMM as an MMIO write.
fn write_status_page(value: u8) -> std::io::Result<()> {
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mem")?;
    const PAGE: usize = 4096;
    // SAFETY: a fresh shared mapping of one page of /dev/mem; nothing else refers to it.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            GUEST_STATUS_ADDR as libc::off_t,
        )
    };
    if page == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: STATUS_OFFSET is inside the page just mapped; the volatile store is the device
    // access itself. The mapping is removed right after and never used again.
    unsafe {
        std::ptr::write_volatile(page.cast::<u8>().add(STATUS_OFFSET as usize), value);
        libc::munmap(page, PAGE);
    }
    Ok(())
}

/// The boot marker the VMM times.
pub fn mark_agent_up() {
    write_status(AGENT_UP);
}

/// Flushes filesystems and resets the machine, which the VMM reads as a clean power-off
/// because we announced it first.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
    unsafe { libc::sync() };
    write_status(SHUTDOWN_FOLLOWS);
    // SAFETY: as above.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    crate::console::line(&format!(
        "cocoon-agent: reboot failed: {}",
        std::io::Error::last_os_error()
    ));
    std::process::exit(1)
}
