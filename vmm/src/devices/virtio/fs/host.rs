//! The host system calls the file server makes, each on a file descriptor the server holds
//! (never on a path the guest spelled out), so that no guest name is ever resolved past one
//! directory and no symbolic link is followed on the host.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The errno a failed call left, for the guest's reply.
pub fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// `/proc/self/fd/N`: reopens exactly the inode `fd` holds, whatever has been renamed or
/// replaced since (the kernel follows the descriptor, not a path).
pub fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number")
}

/// `openat(dir, name, flags)`; `name` is one checked component.
pub fn open_at(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; the result is checked before it is owned.
    let fd = check(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new descriptor on the inode `fd` holds, opened with `flags`.
pub fn reopen(fd: RawFd, flags: i32) -> io::Result<OwnedFd> {
    open_at(libc::AT_FDCWD, &proc_path(fd), flags, 0)
}

/// `fstatat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`: the inode itself.
pub fn stat(fd: RawFd) -> io::Result<libc::stat64> {
    // SAFETY: an all-zero `stat64` is a valid value for the kernel to overwrite.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: the path is an empty C string and `st` is a valid, writable `stat64`.
    check(unsafe {
        libc::fstatat64(
            fd,
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

pub fn statfs(fd: RawFd) -> io::Result<libc::statfs64> {
    // SAFETY: an all-zero `statfs64` is a valid value for the kernel to overwrite.
    let mut st: libc::statfs64 = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable `statfs64`.
    check(unsafe { libc::fstatfs64(fd, &mut st) })?;
    Ok(st)
}

pub fn mkdir_at(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    check(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }).map(drop)
}

pub fn mknod_at(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; device numbers are never passed (callers refuse
    // device nodes).
    check(unsafe { libc::mknodat(dir, name.as_ptr(), mode, 0) }).map(drop)
}

pub fn symlink_at(target: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

/// A new name in `dir` for the inode `fd` holds (through its `/proc` link, which needs no
/// `CAP_DAC_READ_SEARCH`, unlike `AT_EMPTY_PATH`).
pub fn link_at(fd: RawFd, dir: RawFd, name: &CStr) -> io::Result<()> {
    let from = proc_path(fd);
    // SAFETY: both strings are NUL-terminated.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            dir,
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

pub fn unlink_at(dir: RawFd, name: &CStr, flags: i32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    check(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

pub fn rename_at(
    old_dir: RawFd,
    old: &CStr,
    new_dir: RawFd,
    new: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated.
    check(unsafe { libc::renameat2(old_dir, old.as_ptr(), new_dir, new.as_ptr(), flags) }).map(drop)
}

/// The target of the symbolic link `fd` holds (an `O_PATH` descriptor of the link).
pub fn read_link(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: the buffer is writable for its whole length.
    let n = check_size(unsafe {
        libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// Changes the owner of the inode itself (a symbolic link is not followed).
pub fn chown(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain system call on a descriptor we hold.
    check(unsafe {
        libc::fchownat(
            fd,
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// Sets the permission bits of a non-link inode through its `/proc` link (`fchmod` refuses
/// `O_PATH` descriptors).
pub fn chmod(fd: RawFd, mode: u32) -> io::Result<()> {
    let path = proc_path(fd);
    // SAFETY: the path is NUL-terminated.
    check(unsafe { libc::chmod(path.as_ptr(), mode) }).map(drop)
}

/// `utimensat` on the inode's `/proc` link (`UTIME_OMIT` leaves a time as it is).
pub fn set_times(fd: RawFd, atime: libc::timespec, mtime: libc::timespec) -> io::Result<()> {
    let path = proc_path(fd);
    let times = [atime, mtime];
    // SAFETY: the path is NUL-terminated and `times` holds two timespecs.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

pub fn truncate(fd: &OwnedFd, size: u64) -> io::Result<()> {
    let size = i64::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain system call on a descriptor we hold.
    check(unsafe { libc::ftruncate64(fd.as_raw_fd(), size) }).map(drop)
}

pub fn fallocate(fd: &OwnedFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: plain system call on a descriptor we hold.
    check(unsafe { libc::fallocate64(fd.as_raw_fd(), mode, offset, len) }).map(drop)
}

pub fn seek(fd: &OwnedFd, offset: u64, whence: i32) -> io::Result<u64> {
    let offset = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: plain system call on a descriptor we hold.
    let r = unsafe { libc::lseek64(fd.as_raw_fd(), offset, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

pub fn sync(fd: &OwnedFd, data_only: bool) -> io::Result<()> {
    // SAFETY: plain system calls on a descriptor we hold.
    check(unsafe {
        if data_only {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })
    .map(drop)
}

/// Runs `step(done, position)` (one `pread`/`pwrite` of the part not done yet, at `position`)
/// until `len` bytes are done or it returns 0; an offset past what the file can hold is
/// `past_end`. Short only at the end of the file, or after an error that came once something
/// was done.
fn positioned(
    len: usize,
    offset: u64,
    past_end: i32,
    mut step: impl FnMut(usize, i64) -> isize,
) -> io::Result<usize> {
    let mut done = 0;
    while done < len {
        let at = offset
            .checked_add(done as u64)
            .and_then(|o| i64::try_from(o).ok())
            .ok_or_else(|| io::Error::from_raw_os_error(past_end))?;
        match check_size(step(done, at)) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if done > 0 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads at `offset` until `buf` is full or the file ends; returns the bytes read.
pub fn read_at(fd: &OwnedFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let len = buf.len();
    positioned(len, offset, libc::EINVAL, |done, at| {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        unsafe {
            libc::pread64(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                len - done,
                at,
            )
        }
    })
}

/// Writes all of `data` at `offset`; returns the bytes written.
pub fn write_at(fd: &OwnedFd, data: &[u8], offset: u64) -> io::Result<usize> {
    positioned(data.len(), offset, libc::EFBIG, |done, at| {
        // SAFETY: the pointer and length describe the unwritten tail of `data`.
        unsafe {
            libc::pwrite64(
                fd.as_raw_fd(),
                data[done..].as_ptr().cast(),
                data.len() - done,
                at,
            )
        }
    })
}

/// One directory entry as `getdents64` gives it.
pub struct DirEntry {
    pub ino: u64,
    /// Where the next entry starts (to seek to, to continue after this one).
    pub next: u64,
    pub kind: u8,
    pub name: Vec<u8>,
}

/// The entries of the open directory `fd` from position `offset`, one `getdents64` buffer.
pub fn read_dir(fd: &OwnedFd, offset: u64) -> io::Result<Vec<DirEntry>> {
    seek(fd, offset, libc::SEEK_SET)?;
    let mut buf = vec![0u8; 32 * 1024];
    // SAFETY: the buffer is writable for its whole length.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    let n = check_size(n as isize)?;
    let mut entries = Vec::new();
    let mut at = 0usize;
    // linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name (NUL-terminated).
    while at + 19 <= n {
        let field = |o: usize, len: usize| &buf[at + o..at + o + len];
        let ino = u64::from_ne_bytes(field(0, 8).try_into().expect("8 bytes"));
        let next = u64::from_ne_bytes(field(8, 8).try_into().expect("8 bytes"));
        let reclen = u16::from_ne_bytes(field(16, 2).try_into().expect("2 bytes")) as usize;
        if reclen < 19 || at + reclen > n {
            break;
        }
        let kind = buf[at + 18];
        let name = &buf[at + 19..at + reclen];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        entries.push(DirEntry {
            ino,
            next,
            kind,
            name: name.to_vec(),
        });
        at += reclen;
    }
    Ok(entries)
}

/// Raises this process's soft limit on open files to its hard limit (every node the file
/// server holds is a descriptor) and returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write our `rlimit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}
