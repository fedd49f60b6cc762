//! The virtio-fs file server takes any sequence of FUSE requests: no panic, every reply's
//! length field is its length, and nothing outside the share changes (a sibling directory
//! with a file and a symbolic link pointing at it is checked after every input).
#![no_main]

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::OnceLock;

use cocoon_vmm::devices::virtio::fs::protocol::{IN_HEADER_LEN, OUT_HEADER_LEN};
use cocoon_vmm::devices::virtio::fs::{Server, Share};
use libfuzzer_sys::fuzz_target;

/// Opcodes the server serves, and a few it does not.
const OPCODES: [u32; 34] = [
    1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 25, 26, 27, 28, 29, 30, 35,
    36, 38, 42, 43, 45, 46, 22, 39, 4096,
];

struct Scratch {
    share: PathBuf,
    outside: PathBuf,
}

fn scratch() -> &'static Scratch {
    static SCRATCH: OnceLock<Scratch> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        // A request may ask for a huge file (fallocate, truncate, a write far out): the file
        // size limit turns that into EFBIG instead of a full host disk.
        let limit = libc::rlimit {
            rlim_cur: 64 << 20,
            rlim_max: 64 << 20,
        };
        // SAFETY: plain system calls on values of ours.
        unsafe {
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        }
        let root = std::env::temp_dir().join(format!("cocoon-fuzz-fs-{}", std::process::id()));
        let share = root.join("share");
        let outside = root.join("outside");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"secret").unwrap();
        Scratch { share, outside }
    })
}

fn open_path(path: &PathBuf) -> OwnedFd {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; the result is checked before it is owned.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Restores the share to a known state: a file, a directory, links out of the share.
fn reset_share(s: &Scratch) {
    let _ = std::fs::remove_dir_all(&s.share);
    std::fs::create_dir_all(s.share.join("dir")).unwrap();
    std::fs::write(s.share.join("file"), b"0123456789").unwrap();
    std::os::unix::fs::symlink("../outside/secret", s.share.join("rel")).unwrap();
    std::os::unix::fs::symlink(s.outside.join("secret"), s.share.join("abs")).unwrap();
}

fuzz_target!(|data: &[u8]| {
    let s = scratch();
    reset_share(s);
    let mut server = Server::new();
    for (name, read_only) in [("vol", false), ("ro", true)] {
        server
            .add_share(Share {
                name: name.into(),
                root: open_path(&s.share),
                read_only,
            })
            .unwrap();
    }
    // Each request: an opcode pick, a node id pick, a flag byte, a body length, the body.
    let mut rest = data;
    while let Some((&[op, node, flags, len], tail)) = rest.split_first_chunk::<4>() {
        let len = usize::from(len).min(tail.len());
        let (body, tail) = tail.split_at(len);
        rest = tail;
        let opcode = OPCODES[usize::from(op) % OPCODES.len()];
        // Small ids name the root and the nodes handed out so far; 0xff is far out.
        let nodeid = if node == 0xff { u64::MAX } else { u64::from(node % 16) };
        let mut req = Vec::with_capacity(IN_HEADER_LEN + body.len());
        let stated = if flags & 1 != 0 {
            u32::from(flags) << 4
        } else {
            (IN_HEADER_LEN + body.len()) as u32
        };
        req.extend_from_slice(&stated.to_le_bytes());
        req.extend_from_slice(&opcode.to_le_bytes());
        req.extend_from_slice(&7u64.to_le_bytes());
        req.extend_from_slice(&nodeid.to_le_bytes());
        req.extend_from_slice(&u32::from(flags >> 4).to_le_bytes()); // uid
        req.extend_from_slice(&0u32.to_le_bytes()); // gid
        req.extend_from_slice(&[0; 8]);
        req.extend_from_slice(body);
        if let Some(reply) = server.handle(&req) {
            assert!(reply.len() >= OUT_HEADER_LEN);
            let n = u32::from_le_bytes(reply[0..4].try_into().unwrap()) as usize;
            assert_eq!(n, reply.len());
        }
    }
    // Nothing outside the share changed.
    let outside: Vec<_> = std::fs::read_dir(&s.outside).unwrap().collect();
    assert_eq!(outside.len(), 1, "something was made outside the share");
    assert_eq!(std::fs::read(s.outside.join("secret")).unwrap(), b"secret");
    let meta = std::fs::symlink_metadata(s.outside.join("secret")).unwrap();
    assert!(meta.is_file() && meta.len() == 6);
});
