//! The file server against real host directories, driven with the requests a guest sends.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::*;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("cocoon-fs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("share")).unwrap();
        fs::create_dir_all(dir.join("outside")).unwrap();
        fs::write(dir.join("outside/secret"), b"host secret").unwrap();
        Scratch(dir)
    }

    fn share(&self) -> PathBuf {
        self.0.join("share")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn open_path(path: &Path) -> OwnedFd {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    host::open_at(libc::AT_FDCWD, &c, libc::O_PATH, 0).unwrap()
}

/// A server with the scratch share as `vol` (and `ro` read-only), after `INIT`.
fn server(s: &Scratch) -> Server {
    let mut server = Server::new();
    for (name, read_only) in [("vol", false), ("ro", true)] {
        server
            .add_share(Share {
                name: name.into(),
                root: open_path(&s.share()),
                read_only,
            })
            .unwrap();
    }
    let mut init = Vec::new();
    for v in [7u32, 38, 128 * 1024, u32::MAX] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    init.extend_from_slice(&[0; 48]);
    let reply = call(&mut server, opcode::INIT, ROOT_ID, &init).unwrap();
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 7);
    assert_eq!(u32::from_le_bytes(reply[4..8].try_into().unwrap()), 31);
    server
}

fn request(opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
    request_as(0, opcode, nodeid, body)
}

/// A request from the guest user `uid` (and group `uid`).
fn request_as(uid: u32, opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut req = Vec::new();
    req.extend_from_slice(&((protocol::IN_HEADER_LEN + body.len()) as u32).to_le_bytes());
    req.extend_from_slice(&opcode.to_le_bytes());
    req.extend_from_slice(&42u64.to_le_bytes());
    req.extend_from_slice(&nodeid.to_le_bytes());
    req.extend_from_slice(&uid.to_le_bytes());
    req.extend_from_slice(&uid.to_le_bytes());
    // pid, extensions
    req.extend_from_slice(&[0; 8]);
    req.extend_from_slice(body);
    req
}

/// The reply's body, or its errno.
fn call(server: &mut Server, opcode: u32, nodeid: u64, body: &[u8]) -> Result<Vec<u8>, i32> {
    let reply = server
        .handle(&request(opcode, nodeid, body))
        .expect("a reply");
    assert_eq!(
        u32::from_le_bytes(reply[0..4].try_into().unwrap()) as usize,
        reply.len()
    );
    assert_eq!(u64::from_le_bytes(reply[8..16].try_into().unwrap()), 42);
    match i32::from_le_bytes(reply[4..8].try_into().unwrap()) {
        0 => Ok(reply[16..].to_vec()),
        e => Err(-e),
    }
}

fn name(n: &str) -> Vec<u8> {
    let mut v = n.as_bytes().to_vec();
    v.push(0);
    v
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// The node id of an entry reply, and the mode in its attributes.
fn entry(reply: &[u8]) -> (u64, u32) {
    // entry_out: nodeid, generation, 2 timeouts, 2 nsecs = 40 bytes, then fuse_attr (mode at 60)
    (u64_at(reply, 0), u32_at(reply, 40 + 60))
}

fn lookup(server: &mut Server, parent: u64, n: &str) -> Result<(u64, u32), i32> {
    call(server, opcode::LOOKUP, parent, &name(n)).map(|r| entry(&r))
}

/// A `CREATE` body: `fuse_create_in` (flags, mode, umask, open_flags), then the name.
fn create_body(flags: i32, mode: u32, n: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for v in [flags as u32, libc::S_IFREG | mode, 0o022, 0] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.extend_from_slice(&name(n));
    body
}

fn create(server: &mut Server, parent: u64, n: &str, mode: u32) -> Result<(u64, u64), i32> {
    let body = create_body(libc::O_RDWR, mode, n);
    let r = call(server, opcode::CREATE, parent, &body)?;
    Ok((entry(&r).0, u64_at(&r, 40 + 88)))
}

fn open(server: &mut Server, node: u64, flags: i32) -> Result<u64, i32> {
    let mut body = (flags as u32).to_le_bytes().to_vec();
    body.extend_from_slice(&[0; 4]);
    call(server, opcode::OPEN, node, &body).map(|r| u64_at(&r, 0))
}

fn write(server: &mut Server, node: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
    let mut body = Vec::new();
    body.extend_from_slice(&fh.to_le_bytes());
    body.extend_from_slice(&offset.to_le_bytes());
    body.extend_from_slice(&(data.len() as u32).to_le_bytes());
    body.extend_from_slice(&[0; 20]);
    body.extend_from_slice(data);
    call(server, opcode::WRITE, node, &body).map(|r| u32_at(&r, 0))
}

fn read(server: &mut Server, node: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
    let mut body = Vec::new();
    body.extend_from_slice(&fh.to_le_bytes());
    body.extend_from_slice(&offset.to_le_bytes());
    body.extend_from_slice(&size.to_le_bytes());
    body.extend_from_slice(&[0; 20]);
    call(server, opcode::READ, node, &body)
}

fn mknod(server: &mut Server, parent: u64, n: &str, mode: u32) -> Result<(u64, u32), i32> {
    let mut body = Vec::new();
    for v in [mode, 0x0103, 0, 0] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.extend_from_slice(&name(n));
    call(server, opcode::MKNOD, parent, &body).map(|r| entry(&r))
}

fn readdir_names(server: &mut Server, node: u64, size: u32) -> Vec<String> {
    let fh = call(server, opcode::OPENDIR, node, &[0; 8])
        .map(|r| u64_at(&r, 0))
        .unwrap();
    let mut names = Vec::new();
    let mut offset = 0u64;
    loop {
        let mut body = Vec::new();
        body.extend_from_slice(&fh.to_le_bytes());
        body.extend_from_slice(&offset.to_le_bytes());
        body.extend_from_slice(&size.to_le_bytes());
        body.extend_from_slice(&[0; 20]);
        let r = call(server, opcode::READDIR, node, &body).unwrap();
        if r.is_empty() {
            break;
        }
        assert!(r.len() <= size as usize, "a reply fits the guest's buffer");
        let mut at = 0;
        while at < r.len() {
            offset = u64_at(&r, at + 8);
            let len = u32_at(&r, at + 16) as usize;
            names.push(String::from_utf8(r[at + 24..at + 24 + len].to_vec()).unwrap());
            at += (24 + len).div_ceil(8) * 8;
        }
    }
    let mut release = fh.to_le_bytes().to_vec();
    release.extend_from_slice(&[0; 16]);
    call(server, opcode::RELEASEDIR, node, &release).unwrap();
    names.sort();
    names
}

#[test]
fn a_file_made_in_the_guest_is_on_the_host_and_back() {
    let s = Scratch::new("roundtrip");
    let mut server = server(&s);
    let (vol, mode) = lookup(&mut server, ROOT_ID, "vol").unwrap();
    assert_eq!(mode & libc::S_IFMT, libc::S_IFDIR);
    let (file, fh) = create(&mut server, vol, "log", 0o640).unwrap();
    assert_eq!(write(&mut server, file, fh, 0, b"hello ").unwrap(), 6);
    assert_eq!(write(&mut server, file, fh, 6, b"world").unwrap(), 5);
    let path = s.share().join("log");
    assert_eq!(fs::read(&path).unwrap(), b"hello world");
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o640,
        "the guest's mode, whatever the VMM's umask"
    );
    fs::write(&path, b"changed by the host").unwrap();
    assert_eq!(
        read(&mut server, file, fh, 0, 4096).unwrap(),
        b"changed by the host"
    );
    assert_eq!(read(&mut server, file, fh, 8, 2).unwrap(), b"by");

    let mut fsync = fh.to_le_bytes().to_vec();
    fsync.extend_from_slice(&[0; 8]);
    call(&mut server, opcode::FSYNC, file, &fsync).unwrap();
    // FLUSH is declined, so the guest stops sending one at every close; the file stays open.
    let mut flush = fh.to_le_bytes().to_vec();
    flush.extend_from_slice(&[0; 16]);
    assert_eq!(
        call(&mut server, opcode::FLUSH, file, &flush),
        Err(libc::ENOSYS)
    );
    assert_eq!(read(&mut server, file, fh, 0, 7).unwrap(), b"changed");

    // The same inode looked up again is the same node.
    assert_eq!(lookup(&mut server, vol, "log").unwrap().0, file);
    assert_eq!(
        readdir_names(&mut server, ROOT_ID, 4096),
        [".", "..", "ro", "vol"]
    );
    for i in 0..40 {
        fs::write(s.share().join(format!("f{i:02}")), b"").unwrap();
    }
    let names = readdir_names(&mut server, vol, 200);
    assert_eq!(
        names.len(),
        43,
        "., .., log and 40 files over many small replies"
    );
    assert!(names.contains(&"f39".to_string()));
}

#[test]
fn names_cannot_leave_the_share() {
    let s = Scratch::new("escape");
    let mut server = server(&s);
    let (vol, _) = lookup(&mut server, ROOT_ID, "vol").unwrap();
    for bad in ["..", ".", "../outside", "a/b", ""] {
        assert_eq!(lookup(&mut server, vol, bad), Err(libc::EINVAL), "{bad:?}");
    }
    assert_eq!(lookup(&mut server, ROOT_ID, "outside"), Err(libc::ENOENT));
    assert_eq!(lookup(&mut server, ROOT_ID, ".."), Err(libc::ENOENT));
    // Nothing can be made or renamed in the root of the mount.
    assert_eq!(create(&mut server, ROOT_ID, "x", 0o644), Err(libc::EPERM));
    let mut rename = vol.to_le_bytes().to_vec();
    rename.extend_from_slice(&name("vol"));
    rename.extend_from_slice(&name("x"));
    assert_eq!(
        call(&mut server, opcode::RENAME, ROOT_ID, &rename),
        Err(libc::EPERM)
    );

    // Symbolic links out of the share are nodes of their own, never followed on the host.
    std::os::unix::fs::symlink(s.0.join("outside/secret"), s.share().join("abs")).unwrap();
    std::os::unix::fs::symlink("../outside", s.share().join("rel")).unwrap();
    let (abs, mode) = lookup(&mut server, vol, "abs").unwrap();
    assert_eq!(mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(open(&mut server, abs, libc::O_RDONLY), Err(libc::ENXIO));
    let (rel, _) = lookup(&mut server, vol, "rel").unwrap();
    assert_eq!(
        lookup(&mut server, rel, "secret"),
        Err(libc::ENOTDIR),
        "a link is not a directory to look names up in"
    );
    assert!(call(&mut server, opcode::OPENDIR, rel, &[0; 8]).is_err());
    assert_eq!(
        call(&mut server, opcode::READLINK, rel, &[]).unwrap(),
        b"../outside"
    );
    // A link made by the guest is stored, not resolved.
    let mut symlink = name("made");
    symlink.extend_from_slice(&name("/etc/shadow"));
    let made = entry(&call(&mut server, opcode::SYMLINK, vol, &symlink).unwrap());
    assert_eq!(made.1 & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(
        fs::read_link(s.share().join("made")).unwrap(),
        Path::new("/etc/shadow")
    );
    // Opening through the guest-made link is refused too.
    assert_eq!(open(&mut server, made.0, libc::O_RDWR), Err(libc::ENXIO));
    assert_eq!(
        fs::read(s.0.join("outside/secret")).unwrap(),
        b"host secret"
    );
}

#[test]
fn special_files_are_never_opened_and_devices_never_made() {
    let s = Scratch::new("special");
    let mut server = server(&s);
    let (vol, _) = lookup(&mut server, ROOT_ID, "vol").unwrap();
    for kind in [libc::S_IFCHR, libc::S_IFBLK] {
        assert_eq!(
            mknod(&mut server, vol, "dev", kind | 0o666),
            Err(libc::EPERM)
        );
    }
    assert!(!s.share().join("dev").exists());
    // A FIFO can be made (the guest uses it as its own pipe) but is not opened on the host,
    // which would block the device thread.
    let (fifo, mode) = mknod(&mut server, vol, "fifo", libc::S_IFIFO | 0o600).unwrap();
    assert_eq!(mode & libc::S_IFMT, libc::S_IFIFO);
    assert_eq!(open(&mut server, fifo, libc::O_RDONLY), Err(libc::ENXIO));
    let (dir, _) = {
        let mut body = Vec::new();
        body.extend_from_slice(&0o755u32.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&name("d"));
        entry(&call(&mut server, opcode::MKDIR, vol, &body).unwrap())
    };
    assert_eq!(open(&mut server, dir, libc::O_RDONLY), Err(libc::EISDIR));
    // A hard link names only nodes the guest reached, and never a directory.
    let mut link = dir.to_le_bytes().to_vec();
    link.extend_from_slice(&name("dlink"));
    assert_eq!(
        call(&mut server, opcode::LINK, vol, &link),
        Err(libc::EPERM)
    );
    let mut link = 9999u64.to_le_bytes().to_vec();
    link.extend_from_slice(&name("ghost"));
    assert_eq!(
        call(&mut server, opcode::LINK, vol, &link),
        Err(libc::ENOENT)
    );
}

#[test]
fn linking_or_recreating_a_file_does_not_take_it_over() {
    // SAFETY: reads this process's effective uid.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: ownership changes need root");
        return;
    }
    let s = Scratch::new("takeover");
    let path = s.share().join("roots");
    fs::write(&path, b"root's").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let mut server = server(&s);
    let (vol, _) = lookup(&mut server, ROOT_ID, "vol").unwrap();
    let (file, _) = lookup(&mut server, vol, "roots").unwrap();
    let owner = |p: &Path| {
        let m = fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    // Guest user 1234 links it and creates it again without O_EXCL.
    let mut link = file.to_le_bytes().to_vec();
    link.extend_from_slice(&name("mine"));
    let reply = server
        .handle(&request_as(1234, opcode::LINK, vol, &link))
        .unwrap();
    assert_eq!(i32::from_le_bytes(reply[4..8].try_into().unwrap()), 0);
    let create = create_body(libc::O_RDONLY, 0o777, "roots");
    let reply = server
        .handle(&request_as(1234, opcode::CREATE, vol, &create))
        .unwrap();
    assert_eq!(i32::from_le_bytes(reply[4..8].try_into().unwrap()), 0);
    assert_eq!(
        owner(&path),
        (0, 0, 0o600),
        "the existing file stays root's"
    );
    // With O_EXCL the name is taken; a new name is the caller's.
    let create = create_body(libc::O_RDWR | libc::O_EXCL, 0o777, "roots");
    let reply = server
        .handle(&request_as(1234, opcode::CREATE, vol, &create))
        .unwrap();
    assert_eq!(
        i32::from_le_bytes(reply[4..8].try_into().unwrap()),
        -libc::EEXIST
    );
    let create = create_body(libc::O_RDWR | libc::O_EXCL, 0o777, "new");
    server
        .handle(&request_as(1234, opcode::CREATE, vol, &create))
        .unwrap();
    assert_eq!(owner(&s.share().join("new")), (1234, 1234, 0o777));
}

#[test]
fn creating_over_a_fifo_neither_blocks_nor_opens_it() {
    let s = Scratch::new("createfifo");
    let mut server = server(&s);
    let (vol, _) = lookup(&mut server, ROOT_ID, "vol").unwrap();
    mknod(&mut server, vol, "p", libc::S_IFIFO | 0o666).unwrap();
    // Without O_EXCL, on a FIFO nobody writes to: an open would block the server for ever.
    let body = create_body(libc::O_RDONLY, 0o644, "p");
    assert_eq!(
        call(&mut server, opcode::CREATE, vol, &body),
        Err(libc::ENXIO)
    );
    fs::create_dir(s.share().join("d")).unwrap();
    let body = create_body(libc::O_RDONLY, 0o644, "d");
    assert_eq!(
        call(&mut server, opcode::CREATE, vol, &body),
        Err(libc::EISDIR)
    );
}

#[test]
fn renames_stay_in_their_share_and_the_root_statfs_is_whole() {
    let s = Scratch::new("crossshare");
    fs::create_dir(s.share().join("a")).unwrap();
    fs::create_dir(s.share().join("b")).unwrap();
    fs::write(s.share().join("a/f"), b"x").unwrap();
    let mut server = Server::new();
    for share in ["a", "b"] {
        server
            .add_share(Share {
                name: share.into(),
                root: open_path(&s.share().join(share)),
                read_only: false,
            })
            .unwrap();
    }
    let (a, _) = lookup(&mut server, ROOT_ID, "a").unwrap();
    let (b, _) = lookup(&mut server, ROOT_ID, "b").unwrap();
    let mut rename = b.to_le_bytes().to_vec();
    rename.extend_from_slice(&name("f"));
    rename.extend_from_slice(&name("f"));
    assert_eq!(
        call(&mut server, opcode::RENAME, a, &rename),
        Err(libc::EXDEV)
    );
    assert!(s.share().join("a/f").exists());
    let statfs = call(&mut server, opcode::STATFS, ROOT_ID, &[]).unwrap();
    assert_eq!(statfs.len(), 80, "a whole fuse_kstatfs");
    assert_eq!(u32_at(&statfs, 44), 255, "namelen");
}

#[test]
fn set_id_bits_never_reach_the_host() {
    let s = Scratch::new("setid");
    let mut server = server(&s);
    let (vol, _) = lookup(&mut server, ROOT_ID, "vol").unwrap();
    let (file, _) = create(&mut server, vol, "sh", 0o6755).unwrap();
    let mode = |p: &str| fs::metadata(s.share().join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("sh"), 0o755);
    let mut setattr = Vec::new();
    setattr.extend_from_slice(&setattr_valid::MODE.to_le_bytes());
    setattr.extend_from_slice(&[0; 64]);
    setattr.extend_from_slice(&(libc::S_IFREG | 0o4777).to_le_bytes());
    setattr.extend_from_slice(&[0; 16]);
    assert_eq!(setattr.len(), 88);
    call(&mut server, opcode::SETATTR, file, &setattr).unwrap();
    assert_eq!(mode("sh"), 0o777);
}

#[test]
fn a_read_only_share_refuses_every_write() {
    let s = Scratch::new("ro");
    fs::write(s.share().join("data"), b"keep").unwrap();
    let mut server = server(&s);
    let (ro, _) = lookup(&mut server, ROOT_ID, "ro").unwrap();
    assert_eq!(create(&mut server, ro, "new", 0o644), Err(libc::EROFS));
    let (data, _) = lookup(&mut server, ro, "data").unwrap();
    assert_eq!(open(&mut server, data, libc::O_WRONLY), Err(libc::EROFS));
    assert_eq!(open(&mut server, data, libc::O_RDWR), Err(libc::EROFS));
    let fh = open(&mut server, data, libc::O_RDONLY).unwrap();
    assert_eq!(write(&mut server, data, fh, 0, b"x"), Err(libc::EBADF));
    assert_eq!(
        call(&mut server, opcode::UNLINK, ro, &name("data")),
        Err(libc::EROFS)
    );
    assert_eq!(fs::read(s.share().join("data")).unwrap(), b"keep");
}

#[test]
fn malformed_requests_get_errors_not_panics() {
    let s = Scratch::new("malformed");
    let mut server = server(&s);
    let (vol, _) = lookup(&mut server, ROOT_ID, "vol").unwrap();
    let (file, fh) = create(&mut server, vol, "f", 0o644).unwrap();
    // Every opcode with every short body.
    for op in 0..=60 {
        if op == opcode::DESTROY {
            continue;
        }
        for len in 0..24 {
            let body = vec![0xffu8; len];
            for node in [ROOT_ID, vol, file, u64::MAX] {
                let _ = server.handle(&request(op, node, &body));
            }
        }
    }
    // A name without its NUL, a write that claims more data than it carries, a huge read.
    assert_eq!(
        call(&mut server, opcode::LOOKUP, vol, b"abc"),
        Err(libc::EINVAL)
    );
    let mut w = Vec::new();
    w.extend_from_slice(&fh.to_le_bytes());
    w.extend_from_slice(&0u64.to_le_bytes());
    w.extend_from_slice(&1000u32.to_le_bytes());
    w.extend_from_slice(&[0; 20]);
    w.extend_from_slice(b"short");
    assert_eq!(
        call(&mut server, opcode::WRITE, file, &w),
        Err(libc::EINVAL)
    );
    assert_eq!(read(&mut server, file, fh, 0, u32::MAX), Ok(Vec::new()));
    assert_eq!(
        read(&mut server, file, fh, u64::MAX - 1, 16),
        Err(libc::EINVAL)
    );
    assert_eq!(
        write(&mut server, file, fh, u64::MAX, b"x"),
        Err(libc::EFBIG)
    );
    // A batch forget whose count lies.
    let mut forget = u32::MAX.to_le_bytes().to_vec();
    forget.extend_from_slice(&[0; 4]);
    forget.extend_from_slice(&file.to_le_bytes());
    forget.extend_from_slice(&1u64.to_le_bytes());
    assert!(
        server
            .handle(&request(opcode::BATCH_FORGET, 0, &forget))
            .is_none()
    );
    // A header that lies about its length, or no header at all.
    let mut req = request(opcode::GETATTR, ROOT_ID, &[0; 16]);
    req[0..4].copy_from_slice(&1000u32.to_le_bytes());
    assert!(server.handle(&req).is_none());
    assert!(server.handle(&[1, 2, 3]).is_none());
    assert_eq!(fs::read(s.share().join("f")).unwrap(), b"");
}

#[test]
fn forgotten_nodes_are_let_go() {
    let s = Scratch::new("forget");
    let mut server = server(&s);
    let (vol, _) = lookup(&mut server, ROOT_ID, "vol").unwrap();
    fs::write(s.share().join("a"), b"").unwrap();
    let (a, _) = lookup(&mut server, vol, "a").unwrap();
    assert_eq!(lookup(&mut server, vol, "a").unwrap().0, a);
    assert_eq!(server.node_count(), 2);
    assert!(
        server
            .handle(&request(opcode::FORGET, a, &1u64.to_le_bytes()))
            .is_none()
    );
    assert_eq!(server.node_count(), 2, "one lookup is still held");
    server.handle(&request(opcode::FORGET, a, &1u64.to_le_bytes()));
    assert_eq!(server.node_count(), 1);
    assert_eq!(
        call(&mut server, opcode::GETATTR, a, &[0; 16]),
        Err(libc::ENOENT)
    );
}

#[test]
fn share_names_and_kinds_are_checked() {
    let s = Scratch::new("names");
    let mut server = Server::new();
    for bad in ["", ".", "..", "a/b", "sp ace"] {
        let err = server.add_share(Share {
            name: bad.into(),
            root: open_path(&s.share()),
            read_only: false,
        });
        assert!(matches!(err, Err(ShareError::BadName(_))), "{bad:?}");
    }
    let add = |server: &mut Server, path: &Path| {
        server.add_share(Share {
            name: "x".into(),
            root: open_path(path),
            read_only: false,
        })
    };
    add(&mut server, &s.share()).unwrap();
    assert!(matches!(
        add(&mut server, &s.share()),
        Err(ShareError::Duplicate(_))
    ));
    let mut other = Server::new();
    assert!(matches!(
        add(&mut other, Path::new("/dev/null")),
        Err(ShareError::Kind(_))
    ));
    let mut file = Server::new();
    add(&mut file, &s.0.join("outside/secret")).unwrap();
}

#[test]
fn files_of_two_host_file_systems_keep_distinct_inode_numbers() {
    let s = Scratch::new("two-fs");
    fs::write(s.share().join("a"), b"a").unwrap();
    let sub = s.share().join("sub");
    fs::create_dir(&sub).unwrap();
    let c = CString::new(sub.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: NUL-terminated strings alive for the call; no data.
    let mounted = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            c.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    } == 0;
    if !mounted {
        eprintln!("SKIPPED the second file system: cannot mount a tmpfs (not root?)");
        return;
    }
    fs::write(sub.join("b"), b"b").unwrap();
    let host_ino = |p: &Path| fs::symlink_metadata(p).unwrap().ino();
    let (a_host, sub_host, b_host) = (
        host_ino(&s.share().join("a")),
        host_ino(&sub),
        host_ino(&sub.join("b")),
    );
    let mut server = server(&s);
    // entry_out is 40 bytes, then fuse_attr, whose first field is the inode number.
    let ino_of = |server: &mut Server, parent: u64, n: &str| {
        let reply = call(server, opcode::LOOKUP, parent, &name(n)).unwrap();
        (u64_at(&reply, 0), u64_at(&reply, 40))
    };
    let (vol, _) = ino_of(&mut server, ROOT_ID, "vol");
    let (_, a) = ino_of(&mut server, vol, "a");
    let (sub_node, sub_ino) = ino_of(&mut server, vol, "sub");
    let (_, b) = ino_of(&mut server, sub_node, "b");
    // SAFETY: as above.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    assert_eq!(a, a_host, "the first file system keeps the host's numbers");
    assert_eq!((sub_ino, b), (sub_host | 1 << 56, b_host | 1 << 56));
    assert_ne!(sub_ino, ROOT_ID);
    // A listing numbers its entries the same way.
    let fh = u64_at(
        &call(&mut server, opcode::OPENDIR, sub_node, &[0; 8]).unwrap(),
        0,
    );
    let mut body = fh.to_le_bytes().to_vec();
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&4096u32.to_le_bytes());
    body.extend_from_slice(&[0; 12]);
    let listing = call(&mut server, opcode::READDIR, sub_node, &body).unwrap();
    let mut at = 0;
    let mut found = None;
    while at + 24 <= listing.len() {
        let len = u32_at(&listing, at + 16) as usize;
        if &listing[at + 24..at + 24 + len] == b"b" {
            found = Some(u64_at(&listing, at));
        }
        at += (24 + len).div_ceil(8) * 8;
    }
    assert_eq!(found, Some(b));
}
