//! The engine's network namespace: opened and checked to be one, and entered by one thread at a
//! time for the work that must happen inside it (netlink sockets and TAPs belong to the
//! namespace of the thread that makes them).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::NetworkError;

/// `NS_GET_NSTYPE` (`_IO(0xb7, 0x3)`): which kind of namespace an nsfs file is.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Opens `path` and checks that it is a network namespace.
pub fn open(path: &Path) -> Result<File, NetworkError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| NetworkError::Netns {
            path: path.to_owned(),
            reason: source.to_string(),
        })?;
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd we own.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    if kind != libc::CLONE_NEWNET {
        return Err(NetworkError::Netns {
            path: path.to_owned(),
            reason: "not a network namespace".into(),
        });
    }
    Ok(file)
}

/// Runs `work` on a thread of its own that has entered `netns`; the caller's threads stay
/// where they are.
pub fn within<T: Send>(
    netns: &File,
    work: impl FnOnce() -> Result<T, NetworkError> + Send,
) -> Result<T, NetworkError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on a namespace fd we own; it changes only this thread, which
                // ends when `work` returns.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                    return Err(NetworkError::Enter(std::io::Error::last_os_error()));
                }
                work()
            })
            .join()
            .unwrap_or_else(|_| Err(NetworkError::Enter(std::io::Error::other("panicked"))))
    })
}
