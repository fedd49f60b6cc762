//! The passthrough file server: FUSE requests from the guest, answered from host directories
//! and files (the shares).
//!
//! The mount's root is ours, not the host's: a read-only directory whose entries are the
//! shares by name. Below a share every node is an `O_PATH` descriptor, and every name the guest
//! sends is one component looked up with `O_NOFOLLOW` under the descriptor of its parent, so:
//! - `..`, `.`, and names with `/` are refused, and a share's root has no parent on the host;
//! - a symbolic link is never followed on the host: it is a node of its own whose target the
//!   guest reads and resolves in its own namespace;
//! - only regular files and directories are opened; FIFOs, sockets and device nodes are
//!   nodes the guest can `stat` but never opens on the host, and device nodes cannot be made;
//! - a hard link can only name a node the guest already reached, so it cannot reach outside;
//! - set-user-ID (and set-group-ID on files) bits never reach the host.
//!
//! The node and handle tables are bounded, so a guest cannot make the VMM hold unbounded
//! descriptors.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::host::{self, errno};
use super::protocol::{
    self, InHeader, KERNEL_MINOR_VERSION, KERNEL_VERSION, ROOT_ID, Reader, Reply, init_flags,
    opcode, setattr_valid,
};

/// Most nodes the guest may hold at once (each is an open descriptor in the VMM), when the
/// process's descriptor limit allows.
pub const MAX_NODES: usize = 32 * 1024;
/// Most open files and directories at once, likewise.
pub const MAX_HANDLES: usize = 4096;
/// Descriptors left to the rest of the VMM (disks, TAPs, vsock connections, snapshots)
/// whatever the guest holds.
const RESERVED_FDS: u64 = 1024;
/// Largest read or write, and what `INIT` offers as `max_write`.
pub const MAX_IO: u32 = 1 << 20;
const MAX_PAGES: u16 = (MAX_IO / 4096) as u16;
/// How long the guest may cache names and attributes. Short, since the host changes shared
/// files while the container runs.
const CACHE_SECS: u64 = 1;

/// A host directory or file the guest sees as `/<name>` of the mount.
pub struct Share {
    pub name: String,
    /// An `O_PATH` descriptor of the share's root.
    pub root: OwnedFd,
    pub read_only: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("share name {0:?}: use letters, digits, '.', '_' and '-' (not '.' or '..')")]
    BadName(String),
    #[error("a share named {0:?} exists")]
    Duplicate(String),
    #[error("share {name:?}: {source}")]
    Io { name: String, source: io::Error },
    #[error("share {0:?} is neither a directory nor a regular file")]
    Kind(String),
}

struct Node {
    fd: OwnedFd,
    share: usize,
    key: (u64, u64),
    /// Lookups the guest has not forgotten yet.
    lookups: u64,
}

enum Handle {
    File(OwnedFd),
    Dir(OwnedFd),
    /// The mount's own root directory.
    Root,
}

type Outcome = Result<Reply, i32>;

pub struct Server {
    shares: Vec<Share>,
    inodes: InodeSpace,
    nodes: HashMap<u64, Node>,
    by_key: HashMap<(usize, u64, u64), u64>,
    next_node: u64,
    handles: HashMap<u64, Handle>,
    next_handle: u64,
    max_nodes: usize,
    max_handles: usize,
}

/// Host inode numbers are unique within one host file system, and a share can span several
/// (mount points inside it; `-v /:/host`) while the guest sees one file system: without care
/// two files would have one (st_dev, st_ino) there, which `find`, `du`, `tar` and `cp -a` take
/// for a loop or a hard link. The guest's number carries the host file system's index, in the
/// order the server met them, in its top byte (the first keeps the host's numbers).
#[derive(Default)]
struct InodeSpace {
    devs: Vec<u64>,
}

/// File systems told apart; beyond that many the last index is shared (numbers may meet).
const MAX_DEVS: usize = 255;

impl InodeSpace {
    fn ino(&mut self, dev: u64, ino: u64) -> u64 {
        let index = match self.devs.iter().position(|&d| d == dev) {
            Some(i) => i,
            None if self.devs.len() < MAX_DEVS => {
                self.devs.push(dev);
                self.devs.len() - 1
            }
            None => MAX_DEVS,
        };
        ino ^ ((index as u64) << 56)
    }

    /// `st` as the guest is told it.
    fn guest(&mut self, mut st: libc::stat64) -> libc::stat64 {
        st.st_ino = self.ino(st.st_dev, st.st_ino);
        st
    }
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

fn valid_share_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// One path component from the guest: not empty, no `/`, not `.` or `..`.
fn component(name: &[u8]) -> Result<CString, i32> {
    if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
        return Err(libc::EINVAL);
    }
    if name.len() > 255 {
        return Err(libc::ENAMETOOLONG);
    }
    CString::new(name).map_err(|_| libc::EINVAL)
}

/// Permission bits the host keeps from a guest's mode: no set-user-ID, and set-group-ID only
/// on directories (where it means inheritance, not privilege).
fn host_mode(mode: u32, is_dir: bool) -> u32 {
    let mut m = mode & 0o7777 & !libc::S_ISUID;
    if !is_dir {
        m &= !libc::S_ISGID;
    }
    m
}

fn io_err(e: io::Error) -> i32 {
    errno(&e)
}

impl Server {
    /// A server without shares. Raises the process's descriptor limit, and bounds its tables
    /// so that what the guest holds never takes the descriptors the rest of the VMM needs.
    pub fn new() -> Self {
        let budget = host::raise_fd_limit().saturating_sub(RESERVED_FDS) as usize;
        Server {
            max_nodes: MAX_NODES.min(budget / 10 * 9),
            max_handles: MAX_HANDLES.min(budget / 10),
            shares: Vec::new(),
            inodes: InodeSpace::default(),
            nodes: HashMap::new(),
            by_key: HashMap::new(),
            next_node: ROOT_ID + 1,
            handles: HashMap::new(),
            next_handle: 1,
        }
    }

    /// Adds a share; `root` is an `O_PATH` (or any) descriptor of a directory or regular
    /// file, opened by whoever chose it.
    pub fn add_share(&mut self, share: Share) -> Result<(), ShareError> {
        if !valid_share_name(&share.name) {
            return Err(ShareError::BadName(share.name));
        }
        if self.shares.iter().any(|s| s.name == share.name) {
            return Err(ShareError::Duplicate(share.name));
        }
        let st = host::stat(share.root.as_raw_fd()).map_err(|source| ShareError::Io {
            name: share.name.clone(),
            source,
        })?;
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFDIR && kind != libc::S_IFREG {
            return Err(ShareError::Kind(share.name));
        }
        self.shares.push(share);
        Ok(())
    }

    pub fn share_names(&self) -> impl Iterator<Item = &str> {
        self.shares.iter().map(|s| s.name.as_str())
    }

    /// Whether the guest holds any node or open handle (a FUSE session a snapshot cannot
    /// carry).
    pub fn in_use(&self) -> bool {
        !self.nodes.is_empty() || !self.handles.is_empty()
    }

    /// Nodes the guest holds (for tests and metrics).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Serves one request; `None` when the request gets no reply (`FORGET`, or bytes that do
    /// not even hold a header).
    pub fn handle(&mut self, request: &[u8]) -> Option<Vec<u8>> {
        let (header, body) = protocol::parse_header(request).ok()?;
        let mut r = Reader::new(body);
        let outcome = match header.opcode {
            opcode::FORGET => {
                if let Ok(n) = r.u64() {
                    self.forget(header.nodeid, n);
                }
                return None;
            }
            opcode::BATCH_FORGET => {
                self.batch_forget(&mut r);
                return None;
            }
            opcode::INTERRUPT => return None,
            opcode::INIT => self.init(&header, &mut r),
            opcode::DESTROY => {
                self.destroy();
                Ok(Reply::ok(header.unique))
            }
            opcode::LOOKUP => self.lookup(&header, &mut r),
            opcode::GETATTR => self.getattr(&header),
            opcode::SETATTR => self.setattr(&header, &mut r),
            opcode::READLINK => self.readlink(&header),
            opcode::SYMLINK => self.symlink(&header, &mut r),
            opcode::MKNOD => self.mknod(&header, &mut r),
            opcode::MKDIR => self.mkdir(&header, &mut r),
            opcode::UNLINK => self.unlink(&header, &mut r, 0),
            opcode::RMDIR => self.unlink(&header, &mut r, libc::AT_REMOVEDIR),
            opcode::RENAME => self.rename(&header, &mut r, false),
            opcode::RENAME2 => self.rename(&header, &mut r, true),
            opcode::LINK => self.link(&header, &mut r),
            opcode::OPEN => self.open(&header, &mut r),
            opcode::CREATE => self.create(&header, &mut r),
            opcode::READ => self.read(&header, &mut r),
            opcode::WRITE => self.write(&header, &mut r),
            opcode::STATFS => self.statfs(&header),
            opcode::RELEASE | opcode::RELEASEDIR => self.release(&header, &mut r),
            opcode::FSYNC | opcode::FSYNCDIR => self.fsync(&header, &mut r),
            // Nothing to do on a close (host locks are not offered: the guest keeps its own),
            // and ENOSYS has the guest stop sending FLUSH at all: one request less per close
            // of emulated guest kernel work.
            opcode::FLUSH => Err(libc::ENOSYS),
            opcode::OPENDIR => self.opendir(&header),
            opcode::READDIR => self.readdir(&header, &mut r),
            opcode::FALLOCATE => self.fallocate(&header, &mut r),
            opcode::LSEEK => self.lseek(&header, &mut r),
            _ => Err(libc::ENOSYS),
        };
        Some(match outcome {
            Ok(reply) => reply.finish(),
            Err(e) => Reply::error(header.unique, e),
        })
    }

    fn init(&mut self, h: &InHeader, r: &mut Reader) -> Outcome {
        let major = r.u32().map_err(|_| libc::EINVAL)?;
        let minor = r.u32().map_err(|_| libc::EINVAL)?;
        let max_readahead = r.u32().map_err(|_| libc::EINVAL)?;
        let flags = r.u32().map_err(|_| libc::EINVAL)?;
        if major < KERNEL_VERSION {
            return Err(libc::EPROTO);
        }
        let minor = if major > KERNEL_VERSION {
            KERNEL_MINOR_VERSION
        } else {
            minor.min(KERNEL_MINOR_VERSION)
        };
        let offered = init_flags::ASYNC_READ | init_flags::BIG_WRITES | init_flags::MAX_PAGES;
        let mut reply = Reply::ok(h.unique);
        reply
            .u32(KERNEL_VERSION)
            .u32(minor)
            .u32(max_readahead)
            .u32(flags & offered)
            .u16(64) // max_background
            .u16(48) // congestion_threshold
            .u32(MAX_IO) // max_write
            .u32(1) // time_gran: nanoseconds
            .u16(MAX_PAGES)
            .u16(0) // map_alignment: no DAX window
            .u32(0) // flags2
            .bytes(&[0; 28]);
        Ok(reply)
    }

    /// Ends the FUSE session (the driver reset the device, or the guest unmounted): every
    /// node and handle is let go; the shares stay.
    pub fn reset(&mut self) {
        self.destroy();
    }

    fn destroy(&mut self) {
        self.handles.clear();
        self.nodes.clear();
        self.by_key.clear();
    }

    fn node(&self, id: u64) -> Result<&Node, i32> {
        self.nodes.get(&id).ok_or(libc::ENOENT)
    }

    /// The directory a name is looked up or made in: a node below a share (the root holds
    /// only the shares, which the guest cannot change).
    fn parent(&self, id: u64, writing: bool) -> Result<(RawFd, usize), i32> {
        if id == ROOT_ID {
            return Err(if writing { libc::EPERM } else { libc::ENOENT });
        }
        let node = self.node(id)?;
        if writing && self.shares[node.share].read_only {
            return Err(libc::EROFS);
        }
        Ok((node.fd.as_raw_fd(), node.share))
    }

    fn writable(&self, id: u64) -> Result<&Node, i32> {
        if id == ROOT_ID {
            return Err(libc::EPERM);
        }
        let node = self.node(id)?;
        if self.shares[node.share].read_only {
            return Err(libc::EROFS);
        }
        Ok(node)
    }

    /// Makes `fd` (just looked up or made) a node the guest holds one more lookup of, and
    /// writes its `fuse_entry_out`.
    fn remember(&mut self, fd: OwnedFd, share: usize, reply: &mut Reply) -> Result<(), i32> {
        let st = host::stat(fd.as_raw_fd()).map_err(io_err)?;
        let key = (share, st.st_dev, st.st_ino);
        let id = match self.by_key.get(&key) {
            Some(&id) => {
                let node = self.nodes.get_mut(&id).expect("by_key names live nodes");
                node.lookups += 1;
                id
            }
            None => {
                if self.nodes.len() >= self.max_nodes {
                    return Err(libc::ENFILE);
                }
                let id = self.next_node;
                self.next_node += 1;
                self.nodes.insert(
                    id,
                    Node {
                        fd,
                        share,
                        key: (st.st_dev, st.st_ino),
                        lookups: 1,
                    },
                );
                self.by_key.insert(key, id);
                id
            }
        };
        let st = self.inodes.guest(st);
        reply
            .u64(id)
            .u64(0) // generation: node ids are never reused
            .u64(CACHE_SECS)
            .u64(CACHE_SECS)
            .u32(0)
            .u32(0)
            .attr(&st);
        Ok(())
    }

    fn forget(&mut self, id: u64, n: u64) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups == 0 {
            let node = self.nodes.remove(&id).expect("present");
            self.by_key.remove(&(node.share, node.key.0, node.key.1));
        }
    }

    fn batch_forget(&mut self, r: &mut Reader) {
        let Ok(count) = r.u32() else { return };
        if r.skip(4).is_err() {
            return;
        }
        // The count is the guest's word; the bytes that follow bound it.
        for _ in 0..count {
            let (Ok(id), Ok(n)) = (r.u64(), r.u64()) else {
                return;
            };
            self.forget(id, n);
        }
    }

    fn lookup(&mut self, h: &InHeader, r: &mut Reader) -> Outcome {
        let name = r.c_str().map_err(|_| libc::EINVAL)?;
        let mut reply = Reply::ok(h.unique);
        if h.nodeid == ROOT_ID {
            let index = self
                .shares
                .iter()
                .position(|s| s.name.as_bytes() == name)
                .ok_or(libc::ENOENT)?;
            let fd = self.shares[index].root.try_clone().map_err(io_err)?;
            self.remember(fd, index, &mut reply)?;
            return Ok(reply);
        }
        let name = component(name)?;
        let (dir, share) = self.parent(h.nodeid, false)?;
        let fd = host::open_at(dir, &name, libc::O_PATH | libc::O_NOFOLLOW, 0).map_err(io_err)?;
        self.remember(fd, share, &mut reply)?;
        Ok(reply)
    }

    fn root_attr(&self) -> libc::stat64 {
        // SAFETY: all-zero is a valid `stat64`.
        let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
        st.st_ino = ROOT_ID;
        st.st_mode = libc::S_IFDIR | 0o555;
        st.st_nlink = 2;
        st.st_blksize = 4096;
        st
    }

    fn attr_reply(&self, h: &InHeader, st: &libc::stat64) -> Reply {
        let mut reply = Reply::ok(h.unique);
        reply.u64(CACHE_SECS).u32(0).u32(0).attr(st);
        reply
    }

    fn getattr(&mut self, h: &InHeader) -> Outcome {
        let st = if h.nodeid == ROOT_ID {
            self.root_attr()
        } else {
            let st = host::stat(self.node(h.nodeid)?.fd.as_raw_fd()).map_err(io_err)?;
            self.inodes.guest(st)
        };
        Ok(self.attr_reply(h, &st))
    }

    fn setattr(&mut self, h: &InHeader, r: &mut Reader) -> Outcome {
        let e = |_| libc::EINVAL;
        let valid = r.u32().map_err(e)?;
        r.skip(4).map_err(e)?;
        let fh = r.u64().map_err(e)?;
        let size = r.u64().map_err(e)?;
        r.skip(8).map_err(e)?; // lock_owner
        let atime = r.u64().map_err(e)?;
        let mtime = r.u64().map_err(e)?;
        r.skip(8).map_err(e)?; // ctime: the host sets it
        let atimensec = r.u32().map_err(e)?;
        let mtimensec = r.u32().map_err(e)?;
        r.skip(4).map_err(e)?;
        let mode = r.u32().map_err(e)?;
        r.skip(4).map_err(e)?;
        let uid = r.u32().map_err(e)?;
        let gid = r.u32().map_err(e)?;

        let node = self.writable(h.nodeid)?;
        let fd = node.fd.as_raw_fd();
        let st = host::stat(fd).map_err(io_err)?;
        let kind = st.st_mode & libc::S_IFMT;
        if valid & (setattr_valid::UID | setattr_valid::GID) != 0 {
            let uid = if valid & setattr_valid::UID != 0 {
                uid
            } else {
                u32::MAX
            };
            let gid = if valid & setattr_valid::GID != 0 {
                gid
            } else {
                u32::MAX
            };
            host::chown(fd, uid, gid).map_err(io_err)?;
        }
        if valid & setattr_valid::MODE != 0 {
            if kind == libc::S_IFLNK {
                return Err(libc::EOPNOTSUPP);
            }
            host::chmod(fd, host_mode(mode, kind == libc::S_IFDIR)).map_err(io_err)?;
        }
        if valid & setattr_valid::SIZE != 0 {
            if kind != libc::S_IFREG {
                return Err(libc::EINVAL);
            }
            match self.handles.get(&fh) {
                Some(Handle::File(file)) if valid & setattr_valid::FH != 0 => {
                    host::truncate(file, size).map_err(io_err)?
                }
                _ => {
                    let file = host::reopen(fd, libc::O_WRONLY).map_err(io_err)?;
                    host::truncate(&file, size).map_err(io_err)?;
                }
            }
        }
        let time = |set: u32, now: u32, secs: u64, nsec: u32| {
            if valid & now != 0 {
                libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                }
            } else if valid & set != 0 {
                libc::timespec {
                    tv_sec: secs as libc::time_t,
                    tv_nsec: i64::from(nsec.min(999_999_999)),
                }
            } else {
                libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                }
            }
        };
        let times_asked = setattr_valid::ATIME
            | setattr_valid::MTIME
            | setattr_valid::ATIME_NOW
            | setattr_valid::MTIME_NOW;
        if valid & times_asked != 0 {
            if kind == libc::S_IFLNK {
                return Err(libc::EOPNOTSUPP);
            }
            host::set_times(
                fd,
                time(
                    setattr_valid::ATIME,
                    setattr_valid::ATIME_NOW,
                    atime,
                    atimensec,
                ),
                time(
                    setattr_valid::MTIME,
                    setattr_valid::MTIME_NOW,
                    mtime,
                    mtimensec,
                ),
            )
            .map_err(io_err)?;
        }
        let st = host::stat(fd).map_err(io_err)?;
        let st = self.inodes.guest(st);
        Ok(self.attr_reply(h, &st))
    }

    fn readlink(&mut self, h: &InHeader) -> Outcome {
        let target = host::read_link(self.node(h.nodeid)?.fd.as_raw_fd()).map_err(io_err)?;
        let mut reply = Reply::ok(h.unique);
        reply.bytes(&target);
        Ok(reply)
    }

    /// Looks up what was just made as `name` in `dir`, gives it the caller's ownership, and
    /// answers with its entry.
    fn made(
        &mut self,
        h: &InHeader,
        dir: RawFd,
        share: usize,
        name: &CString,
        kind: u32,
        mode: Option<u32>,
    ) -> Outcome {
        let fd = host::open_at(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0).map_err(io_err)?;
        // Another writer of the host directory may have swapped the name since: only the
        // node just made (of its kind, and no other name's if not a directory) is given away.
        let st = host::stat(fd.as_raw_fd()).map_err(io_err)?;
        if st.st_mode & libc::S_IFMT != kind || (kind != libc::S_IFDIR && st.st_nlink != 1) {
            return Err(libc::EEXIST);
        }
        self.own(h, &fd, mode)?;
        self.entry(h, fd, share)
    }

    /// The entry reply for node `fd`, which the guest now holds one more lookup of.
    fn entry(&mut self, h: &InHeader, fd: OwnedFd, share: usize) -> Outcome {
        let mut reply = Reply::ok(h.unique);
        self.remember(fd, share, &mut reply)?;
        Ok(reply)
    }

    /// The new node belongs to the guest's caller and has exactly the mode asked (the VMM's
    /// umask must not change it). Without `CAP_CHOWN` the VMM's own ownership stays.
    fn own(&self, h: &InHeader, fd: &OwnedFd, mode: Option<u32>) -> Result<(), i32> {
        match host::chown(fd.as_raw_fd(), h.uid, h.gid) {
            Ok(()) => {}
            Err(e) if errno(&e) == libc::EPERM => {}
            Err(e) => return Err(errno(&e)),
        }
        if let Some(mode) = mode {
            host::chmod(fd.as_raw_fd(), mode).map_err(io_err)?;
        }
        Ok(())
    }

    fn symlink(&mut self, h: &InHeader, r: &mut Reader) -> Outcome {
        let name = component(r.c_str().map_err(|_| libc::EINVAL)?)?;
        let target = r.c_str().map_err(|_| libc::EINVAL)?;
        if target.is_empty() || target.len() >= libc::PATH_MAX as usize {
            return Err(libc::EINVAL);
        }
        let target = CString::new(target).map_err(|_| libc::EINVAL)?;
        let (dir, share) = self.parent(h.nodeid, true)?;
        host::symlink_at(&target, dir, &name).map_err(io_err)?;
        self.made(h, dir, share, &name, libc::S_IFLNK, None)
    }

    fn mknod(&mut self, h: &InHeader, r: &mut Reader) -> Outcome {
        let mode = r.u32().map_err(|_| libc::EINVAL)?;
        r.skip(12).map_err(|_| libc::EINVAL)?; // rdev, umask (already applied), padding
        let name = component(r.c_str().map_err(|_| libc::EINVAL)?)?;
        let kind = mode & libc::S_IFMT;
        // Device nodes would be the host's devices to whoever opens them on the host.
        if ![libc::S_IFIFO, libc::S_IFSOCK, libc::S_IFREG].contains(&kind) {
            return Err(libc::EPERM);
        }
        let (dir, share) = self.parent(h.nodeid, true)?;
        let perm = host_mode(mode, false);
        host::mknod_at(dir, &name, kind | perm).map_err(io_err)?;
        self.made(h, dir, share, &name, kind, Some(perm))
    }

    fn mkdir(&mut self, h: &InHeader, r: &mut Reader) -> Outcome {
        let mode = r.u32().map_err(|_| libc::EINVAL)?;
        r.skip(4).map_err(|_| libc::EINVAL)?;
        let name = component(r.c_str().map_err(|_| libc::EINVAL)?)?;
        let (dir, share) = self.parent(h.nodeid, true)?;
        let perm = host_mode(mode, true);
        host::mkdir_at(dir, &name, perm).map_err(io_err)?;
        self.made(h, dir, share, &name, libc::S_IFDIR, Some(perm))
    }

    fn unlink(&mut self, h: &InHeader, r: &mut Reader, flags: i32) -> Outcome {
        let name = component(r.c_str().map_err(|_| libc::EINVAL)?)?;
        let (dir, _) = self.parent(h.nodeid, true)?;
        host::unlink_at(dir, &name, flags).map_err(io_err)?;
        Ok(Reply::ok(h.unique))
    }

    fn rename(&mut self, h: &InHeader, r: &mut Reader, with_flags: bool) -> Outcome {
        let new_parent = r.u64().map_err(|_| libc::EINVAL)?;
        let flags = if with_flags {
            let flags = r.u32().map_err(|_| libc::EINVAL)?;
            r.skip(4).map_err(|_| libc::EINVAL)?;
            flags
        } else {
            0
        };
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return Err(libc::EINVAL);
        }
        let old = component(r.c_str().map_err(|_| libc::EINVAL)?)?;
        let new = component(r.c_str().map_err(|_| libc::EINVAL)?)?;
        let (old_dir, old_share) = self.parent(h.nodeid, true)?;
        let (new_dir, new_share) = self.parent(new_parent, true)?;
        // As for links: an inode (its owner, its other names) never moves between shares.
        if old_share != new_share {
            return Err(libc::EXDEV);
        }
        host::rename_at(old_dir, &old, new_dir, &new, flags).map_err(io_err)?;
        Ok(Reply::ok(h.unique))
    }

    fn link(&mut self, h: &InHeader, r: &mut Reader) -> Outcome {
        let old = r.u64().map_err(|_| libc::EINVAL)?;
        let name = component(r.c_str().map_err(|_| libc::EINVAL)?)?;
        let (dir, share) = self.parent(h.nodeid, true)?;
        let old = self.writable(old)?;
        if old.share != share {
            return Err(libc::EXDEV);
        }
        let st = host::stat(old.fd.as_raw_fd()).map_err(io_err)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(libc::EPERM);
        }
        host::link_at(old.fd.as_raw_fd(), dir, &name).map_err(io_err)?;
        // A new name for an inode that exists: its owner and mode stay what they are.
        let fd = host::open_at(dir, &name, libc::O_PATH | libc::O_NOFOLLOW, 0).map_err(io_err)?;
        self.entry(h, fd, share)
    }

    fn add_handle(&mut self, handle: Handle) -> Result<u64, i32> {
        if self.handles.len() >= self.max_handles {
            return Err(libc::ENFILE);
        }
        let fh = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(fh, handle);
        Ok(fh)
    }

    fn open_reply(&mut self, h: &InHeader, handle: Handle) -> Outcome {
        let fh = self.add_handle(handle)?;
        let mut reply = Reply::ok(h.unique);
        // No FOPEN_KEEP_CACHE: each open drops the guest's cached pages, so what the host
        // wrote meanwhile is seen.
        reply.u64(fh).u32(0).u32(0);
        Ok(reply)
    }

    /// Open flags the host honours; the rest (creation, `O_NOFOLLOW`, `O_PATH`, ...) are the
    /// guest kernel's business or refused.
    fn open_flags(&self, flags: u32, read_only_share: bool) -> Result<i32, i32> {
        let flags = flags as i32;
        let access = flags & libc::O_ACCMODE;
        if access == libc::O_ACCMODE {
            return Err(libc::EINVAL);
        }
        if read_only_share && access != libc::O_RDONLY {
            return Err(libc::EROFS);
        }
        Ok(access
            | (flags & (libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC | libc::O_NONBLOCK))
            | libc::O_NOCTTY)
    }

    fn open(&mut self, h: &InHeader, r: &mut Reader) -> Outcome {
        let flags = r.u32().map_err(|_| libc::EINVAL)?;
        let node = self.node(h.nodeid)?;
        let flags = self.open_flags(flags, self.shares[node.share].read_only)?;
        let st = host::stat(node.fd.as_raw_fd()).map_err(io_err)?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(libc::EISDIR),
            // FIFOs, sockets and devices are never opened on the host.
            _ => return Err(libc::ENXIO),
        }
        let file = host::reopen(node.fd.as_raw_fd(), flags).map_err(io_err)?;
        self.open_reply(h, Handle::File(file))
    }

    fn create(&mut self, h: &InHeader, r: &mut Reader) -> Outcome {
        let e = |_| libc::EINVAL;
        let flags = r.u32().map_err(e)?;
        let mode = r.u32().map_err(e)?;
        r.skip(8).map_err(e)?; // umask (applied by the guest), open_flags
        let name = component(r.c_str().map_err(e)?)?;
        let (dir, share) = self.parent(h.nodeid, true)?;
        let open = self.open_flags(flags, false)?;
        let exclusive = flags as i32 & libc::O_EXCL != 0;
        let perm = host_mode(mode, false);
        // Made here, or (without O_EXCL) a file that already had the name: only a file made
        // here is given the caller's ownership and mode.
        let made = host::open_at(
            dir,
            &name,
            open | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            perm,
        );
        let (file, node_fd) = match made {
            Ok(file) => {
                // The node is the inode just made, not whatever the name means by now.
                let node_fd = host::reopen(file.as_raw_fd(), libc::O_PATH).map_err(io_err)?;
                self.own(h, &node_fd, Some(perm))?;
                (file, node_fd)
            }
            Err(e) if errno(&e) == libc::EEXIST && !exclusive => {
                // Looked at before it is opened: a FIFO would block the server, a device
                // node is the host's device.
                let node_fd = host::open_at(dir, &name, libc::O_PATH | libc::O_NOFOLLOW, 0)
                    .map_err(io_err)?;
                let st = host::stat(node_fd.as_raw_fd()).map_err(io_err)?;
                match st.st_mode & libc::S_IFMT {
                    libc::S_IFREG => {}
                    libc::S_IFDIR => return Err(libc::EISDIR),
                    _ => return Err(libc::ENXIO),
                }
                let file = host::reopen(node_fd.as_raw_fd(), open).map_err(io_err)?;
                if flags as i32 & libc::O_TRUNC != 0 {
                    host::truncate(&file, 0).map_err(io_err)?;
                }
                (file, node_fd)
            }
            Err(e) => return Err(errno(&e)),
        };
        // The handle first: a node the guest never hears of would never be forgotten.
        let fh = self.add_handle(Handle::File(file))?;
        let mut reply = Reply::ok(h.unique);
        if let Err(e) = self.remember(node_fd, share, &mut reply) {
            self.handles.remove(&fh);
            return Err(e);
        }
        reply.u64(fh).u32(0).u32(0);
        Ok(reply)
    }

    fn file(&self, fh: u64) -> Result<&OwnedFd, i32> {
        match self.handles.get(&fh) {
            Some(Handle::File(f)) => Ok(f),
            _ => Err(libc::EBADF),
        }
    }

    fn read(&mut self, h: &InHeader, r: &mut Reader) -> Outcome {
        let fh = r.u64().map_err(|_| libc::EINVAL)?;
        let offset = r.u64().map_err(|_| libc::EINVAL)?;
        let size = r.u32().map_err(|_| libc::EINVAL)?;
        let file = self.file(fh)?;
        let mut buf = vec![0u8; size.min(MAX_IO) as usize];
        let n = host::read_at(file, &mut buf, offset).map_err(io_err)?;
        let mut reply = Reply::ok(h.unique);
        reply.bytes(&buf[..n]);
        Ok(reply)
    }

    fn write(&mut self, h: &InHeader, r: &mut Reader) -> Outcome {
        let e = |_| libc::EINVAL;
        let fh = r.u64().map_err(e)?;
        let offset = r.u64().map_err(e)?;
        let size = r.u32().map_err(e)?;
        r.skip(20).map_err(e)?; // write_flags, lock_owner, flags, padding
        if size > MAX_IO {
            return Err(libc::EINVAL);
        }
        let data = r.bytes(size as usize).map_err(e)?;
        let file = self.file(fh)?;
        let n = host::write_at(file, data, offset).map_err(io_err)?;
        let mut reply = Reply::ok(h.unique);
        reply.u32(n as u32).u32(0);
        Ok(reply)
    }

    fn statfs(&mut self, h: &InHeader) -> Outcome {
        let mut reply = Reply::ok(h.unique);
        if h.nodeid == ROOT_ID {
            // fuse_kstatfs: five counts, bsize, namelen, frsize, padding, spare[6].
            reply
                .bytes(&[0; 40])
                .u32(4096)
                .u32(255)
                .u32(4096)
                .bytes(&[0; 28]);
            return Ok(reply);
        }
        let st = host::statfs(self.node(h.nodeid)?.fd.as_raw_fd()).map_err(io_err)?;
        reply
            .u64(st.f_blocks)
            .u64(st.f_bfree)
            .u64(st.f_bavail)
            .u64(st.f_files)
            .u64(st.f_ffree)
            .u32(st.f_bsize as u32)
            .u32(st.f_namelen as u32)
            .u32(st.f_frsize as u32)
            .u32(0)
            .bytes(&[0; 24]);
        Ok(reply)
    }

    fn release(&mut self, h: &InHeader, r: &mut Reader) -> Outcome {
        let fh = r.u64().map_err(|_| libc::EINVAL)?;
        self.handles.remove(&fh);
        Ok(Reply::ok(h.unique))
    }

    fn fsync(&mut self, h: &InHeader, r: &mut Reader) -> Outcome {
        let fh = r.u64().map_err(|_| libc::EINVAL)?;
        let flags = r.u32().map_err(|_| libc::EINVAL)?;
        match self.handles.get(&fh) {
            Some(Handle::File(fd) | Handle::Dir(fd)) => {
                host::sync(fd, flags & 1 != 0).map_err(io_err)?
            }
            Some(Handle::Root) => {}
            None => return Err(libc::EBADF),
        }
        Ok(Reply::ok(h.unique))
    }

    fn opendir(&mut self, h: &InHeader) -> Outcome {
        if h.nodeid == ROOT_ID {
            return self.open_reply(h, Handle::Root);
        }
        let node = self.node(h.nodeid)?;
        let dir = host::open_at(
            node.fd.as_raw_fd(),
            c".",
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
        .map_err(io_err)?;
        self.open_reply(h, Handle::Dir(dir))
    }

    fn readdir(&mut self, h: &InHeader, r: &mut Reader) -> Outcome {
        let fh = r.u64().map_err(|_| libc::EINVAL)?;
        let offset = r.u64().map_err(|_| libc::EINVAL)?;
        let size = r.u32().map_err(|_| libc::EINVAL)?.min(MAX_IO) as usize;
        let mut reply = Reply::ok(h.unique);
        let add = |reply: &mut Reply, ino: u64, next: u64, kind: u8, name: &[u8]| -> bool {
            let before = reply.body_len();
            reply
                .u64(ino)
                .u64(next)
                .u32(name.len() as u32)
                .u32(u32::from(kind))
                .bytes(name)
                .pad8();
            if reply.body_len() > size {
                reply.truncate_body(before);
                return false;
            }
            true
        };
        let inodes = &mut self.inodes;
        match self.handles.get(&fh) {
            Some(Handle::Root) => {
                let mut entries: Vec<(u64, u8, &[u8])> = vec![
                    (ROOT_ID, libc::DT_DIR, b"."),
                    (ROOT_ID, libc::DT_DIR, b".."),
                ];
                for share in &self.shares {
                    let st = host::stat(share.root.as_raw_fd()).map_err(io_err)?;
                    let kind = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                        libc::DT_DIR
                    } else {
                        libc::DT_REG
                    };
                    entries.push((
                        inodes.ino(st.st_dev, st.st_ino),
                        kind,
                        share.name.as_bytes(),
                    ));
                }
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize)
                {
                    if !add(&mut reply, ino, i as u64 + 1, kind, name) {
                        break;
                    }
                }
            }
            Some(Handle::Dir(dir)) => {
                // Entries are numbered as the directory's file system (a mount point's entry
                // is the covered directory's, as the host lists it).
                let dev = host::stat(dir.as_raw_fd()).map_err(io_err)?.st_dev;
                let mut at = offset;
                'outer: loop {
                    let entries = host::read_dir(dir, at).map_err(io_err)?;
                    if entries.is_empty() {
                        break;
                    }
                    for e in entries {
                        let ino = inodes.ino(dev, e.ino);
                        if !add(&mut reply, ino, e.next, e.kind, &e.name) {
                            break 'outer;
                        }
                        at = e.next;
                    }
                }
            }
            _ => return Err(libc::EBADF),
        }
        Ok(reply)
    }

    fn fallocate(&mut self, h: &InHeader, r: &mut Reader) -> Outcome {
        let fh = r.u64().map_err(|_| libc::EINVAL)?;
        let offset = r.u64().map_err(|_| libc::EINVAL)?;
        let length = r.u64().map_err(|_| libc::EINVAL)?;
        let mode = r.u32().map_err(|_| libc::EINVAL)?;
        let allowed =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode as i32 & !allowed != 0 {
            return Err(libc::EOPNOTSUPP);
        }
        host::fallocate(self.file(fh)?, mode as i32, offset, length).map_err(io_err)?;
        Ok(Reply::ok(h.unique))
    }

    fn lseek(&mut self, h: &InHeader, r: &mut Reader) -> Outcome {
        let fh = r.u64().map_err(|_| libc::EINVAL)?;
        let offset = r.u64().map_err(|_| libc::EINVAL)?;
        let whence = r.u32().map_err(|_| libc::EINVAL)? as i32;
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return Err(libc::EINVAL);
        }
        let at = host::seek(self.file(fh)?, offset, whence).map_err(io_err)?;
        let mut reply = Reply::ok(h.unique);
        reply.u64(at);
        Ok(reply)
    }
}

#[cfg(test)]
mod tests;
