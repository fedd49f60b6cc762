//! The guest console. With the VMM's console off there is no console device at all, and every
//! write here is silently dropped.

use std::io::Write;
use std::os::fd::AsRawFd;

/// Points stdin/stdout/stderr at /dev/console (the kernel may not have had one to give us
/// before devtmpfs was mounted).
pub fn reopen() {
    if let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors; `console` stays open during the call.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
}

/// Writes one line to the console.
pub fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}
