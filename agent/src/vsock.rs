//! AF_VSOCK stream sockets, which std does not have.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

/// The host's context id.
pub const HOST_CID: u32 = 2;

fn check(rc: libc::c_int) -> std::io::Result<libc::c_int> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn address(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value to fill in.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the returned fd is ours alone.
    let fd =
        check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A listening vsock socket on `port` (any CID).
pub struct Listener(OwnedFd);

impl Listener {
    pub fn bind(port: u32) -> std::io::Result<Listener> {
        use std::os::fd::AsRawFd;
        let fd = socket()?;
        let addr = address(libc::VMADDR_CID_ANY, port);
        let len = size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: addr is a valid sockaddr_vm of `len` bytes, alive for the call.
        check(unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) })?;
        // SAFETY: listen on our own socket.
        check(unsafe { libc::listen(fd.as_raw_fd(), 64) })?;
        Ok(Listener(fd))
    }

    /// The next connection, as a File for Read/Write.
    pub fn accept(&self) -> std::io::Result<File> {
        use std::os::fd::AsRawFd;
        // SAFETY: accept4 with no address out-parameters on our listening socket.
        let fd = check(unsafe {
            libc::accept4(
                self.0.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        })?;
        // SAFETY: fd was just returned by accept4 and is owned by nothing else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

/// Connects to `port` on `cid`.
pub fn connect(cid: u32, port: u32) -> std::io::Result<File> {
    use std::os::fd::{AsRawFd, IntoRawFd};
    let fd = socket()?;
    let addr = address(cid, port);
    let len = size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes, alive for the call.
    check(unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) })?;
    // SAFETY: ownership of the fd moves into the File.
    Ok(unsafe { File::from_raw_fd(fd.into_raw_fd()) })
}

/// Half-closes a stream: the peer reads EOF, we can still read.
pub fn shutdown_write(stream: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown(2) on a socket we own; failure only means it is already closed.
    unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) };
}

/// Sets (or with `None` clears) SO_RCVTIMEO on a stream.
pub fn set_read_timeout(stream: &File, timeout: Option<std::time::Duration>) {
    use std::os::fd::AsRawFd;
    let timeout = timeout.unwrap_or_default();
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: tv is a valid timeval of the given size, alive for the call.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
}
