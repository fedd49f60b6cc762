//! The host side of a container's terminal: a pty pair whose master goes to the engine over
//! `--console-socket` (SCM_RIGHTS, as runc sends it) and whose slave the runtime relays to the
//! guest's own pty.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

fn last_error(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A new pty pair, the slave in raw mode: the guest's pty already does the line discipline,
/// and doing it twice would echo and translate everything twice.
pub fn open_pty() -> std::io::Result<Pty> {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds into the out-parameters; the name and settings are null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(last_error("openpty"));
    }
    // SAFETY: openpty returned two new fds nothing else owns.
    let pty = unsafe {
        Pty {
            master: OwnedFd::from_raw_fd(master),
            slave: OwnedFd::from_raw_fd(slave),
        }
    };
    // SAFETY: termios is plain data, filled by tcgetattr before use.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: the slave is a tty fd; termios is a valid out-parameter.
    unsafe {
        if libc::tcgetattr(pty.slave.as_raw_fd(), &mut termios) != 0 {
            return Err(last_error("tcgetattr"));
        }
        libc::cfmakeraw(&mut termios);
        if libc::tcsetattr(pty.slave.as_raw_fd(), libc::TCSANOW, &termios) != 0 {
            return Err(last_error("tcsetattr"));
        }
    }
    Ok(pty)
}

/// Sends `fd` over the Unix socket at `path`, the way runc hands over a console.
pub fn send_fd(path: &Path, fd: RawFd) -> std::io::Result<()> {
    // The engine picks the path (runc accepts any length).
    let socket = cocoon_agent_protocol::client::connect_unix(path)?;
    let name = b"/dev/ptmx";
    let mut iov = libc::iovec {
        iov_base: name.as_ptr() as *mut libc::c_void,
        iov_len: name.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; the fields set below point at buffers that outlive sendmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg has a control buffer of CMSG_SPACE(sizeof fd) bytes, so the first header and
    // its data fit; CMSG_FIRSTHDR/CMSG_DATA point inside it.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&msg);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<RawFd>(), fd);
    }
    // SAFETY: msg is fully initialised and its buffers are alive.
    if unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, 0) } < 0 {
        return Err(last_error("send the console over the socket"));
    }
    Ok(())
}

/// The terminal size of `fd`, if it has one.
pub fn window_size(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data; TIOCGWINSZ fills it.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: fd is a tty fd we hold; size is a valid out-parameter.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) } != 0 || size.ws_row == 0 {
        return None;
    }
    Some((size.ws_row, size.ws_col))
}
