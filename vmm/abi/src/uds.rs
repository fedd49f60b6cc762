//! Unix sockets at paths of any length.

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Longest path a `sockaddr_un` holds, without its terminating NUL.
const SUN_PATH_MAX: usize = 107;

/// Runs `op` (a bind or a connect) on the Unix socket `path`, whatever the length of `path`.
///
/// Engines choose where a container's state lives and its id (Docker's state directories are
/// ~99 bytes before any file name), so a socket path in there may be past `sockaddr_un`'s 108
/// bytes. A long path is reached as `/proc/self/fd/<dir fd>/<name>` instead: the kernel
/// resolves the directory through the fd, so the socket is still the file in the state
/// directory (removed with it) and both sides agree on it without any other shared name.
pub fn with_unix_path<T>(
    path: &Path,
    op: impl FnOnce(&Path) -> std::io::Result<T>,
) -> std::io::Result<T> {
    if path.as_os_str().len() <= SUN_PATH_MAX {
        return op(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return op(path);
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    // O_PATH: the fd only names the directory, so no read permission on it is needed.
    let dir_fd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)?;
    let short = Path::new("/proc/self/fd")
        .join(std::os::fd::AsRawFd::as_raw_fd(&dir_fd).to_string())
        .join(name);
    // The fd must stay open until the kernel has resolved the path.
    let result = op(&short);
    drop(dir_fd);
    result
}

/// `UnixStream::connect` for a path of any length (see [`with_unix_path`]).
pub fn connect_unix(path: &Path) -> std::io::Result<UnixStream> {
    with_unix_path(path, |p| UnixStream::connect(p))
}

/// `UnixListener::bind` for a path of any length (see [`with_unix_path`]).
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    with_unix_path(path, |p| UnixListener::bind(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn unix_sockets_work_past_sun_path() {
        // Docker's state directory and more: well past the 108 bytes of a sockaddr_un.
        let dir = std::env::temp_dir()
            .join(format!("cocoon-long-{}", std::process::id()))
            .join("d".repeat(120))
            .join("e".repeat(100));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vsock.sock");
        assert!(path.as_os_str().len() > 200);
        assert!(UnixListener::bind(&path).is_err());

        let listener = bind_unix(&path).unwrap();
        assert!(std::fs::symlink_metadata(&path).is_ok());
        let mut client = connect_unix(&path).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");

        // A directory that does not exist fails as a plain connect would.
        assert!(connect_unix(Path::new("/nonexistent").join("x".repeat(120)).as_path()).is_err());
        std::fs::remove_dir_all(dir.parent().unwrap().parent().unwrap()).unwrap();
    }
}
