//! The FUSE wire format (Linux `include/uapi/linux/fuse.h`, protocol 7.x) as the guest's
//! virtio-fs driver speaks it: the request reader and the reply writer.
//!
//! Every request is untrusted bytes. Fields are read one by one from a bounded slice, so a
//! short or lying request is an error reply, never an out-of-range read; nothing is cast from
//! guest bytes.

/// The protocol major version we speak; minor versions are negotiated down to ours.
pub const KERNEL_VERSION: u32 = 7;
pub const KERNEL_MINOR_VERSION: u32 = 31;
/// The node id of a mount's root.
pub const ROOT_ID: u64 = 1;

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;

/// Opcodes we serve (the rest get `ENOSYS`).
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
}

/// `fuse_init_out.flags` bits we offer.
pub mod init_flags {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const MAX_PAGES: u32 = 1 << 22;
}

/// `fuse_setattr_in.valid` bits.
pub mod setattr_valid {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
}

/// The fixed part of every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    /// The whole request's length, header included, as the guest states it.
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// A request that cannot be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the request ends inside a field")]
    Short,
    #[error("the header's length {stated} disagrees with the {actual} bytes the guest gave")]
    Length { stated: u32, actual: usize },
}

/// Reads little-endian fields from the front of a request's bytes.
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ParseError> {
        if self.rest.len() < n {
            return Err(ParseError::Short);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ParseError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub fn u16(&mut self) -> Result<u16, ParseError> {
        self.array().map(u16::from_le_bytes)
    }

    pub fn u32(&mut self) -> Result<u32, ParseError> {
        self.array().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, ParseError> {
        self.array().map(u64::from_le_bytes)
    }

    pub fn skip(&mut self, n: usize) -> Result<(), ParseError> {
        self.bytes(n).map(|_| ())
    }

    /// A NUL-terminated name; the NUL is consumed, not returned.
    pub fn c_str(&mut self) -> Result<&'a [u8], ParseError> {
        let end = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(ParseError::Short)?;
        let name = &self.rest[..end];
        self.rest = &self.rest[end + 1..];
        Ok(name)
    }

    /// Everything not read yet.
    pub fn remaining(&self) -> &'a [u8] {
        self.rest
    }
}

/// Parses the header and checks its length against what the guest handed over. Returns the
/// header and the request's body (after the header, up to the stated length).
pub fn parse_header(bytes: &[u8]) -> Result<(InHeader, &[u8]), ParseError> {
    let mut r = Reader::new(bytes);
    let header = InHeader {
        len: r.u32()?,
        opcode: r.u32()?,
        unique: r.u64()?,
        nodeid: r.u64()?,
        uid: r.u32()?,
        gid: r.u32()?,
        pid: r.u32()?,
    };
    // total_extlen and padding: we negotiate no request extensions.
    r.skip(4)?;
    let stated = header.len as usize;
    if stated < IN_HEADER_LEN || stated > bytes.len() {
        return Err(ParseError::Length {
            stated: header.len,
            actual: bytes.len(),
        });
    }
    Ok((header, &bytes[IN_HEADER_LEN..stated]))
}

/// A reply under construction: the out header, then the body.
pub struct Reply {
    bytes: Vec<u8>,
}

impl Reply {
    /// A successful reply to request `unique`; the body follows.
    pub fn ok(unique: u64) -> Self {
        let mut bytes = Vec::with_capacity(128);
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&0i32.to_le_bytes());
        bytes.extend_from_slice(&unique.to_le_bytes());
        Reply { bytes }
    }

    /// An error reply (`errno` positive, as in `libc::ENOENT`).
    pub fn error(unique: u64, errno: i32) -> Vec<u8> {
        let mut r = Reply::ok(unique);
        r.bytes[4..8].copy_from_slice(&(-errno.abs()).to_le_bytes());
        r.finish()
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(v);
        self
    }

    /// Zero bytes up to the next multiple of 8 (directory entries are 8-aligned).
    pub fn pad8(&mut self) -> &mut Self {
        while !(self.bytes.len() - OUT_HEADER_LEN).is_multiple_of(8) {
            self.bytes.push(0);
        }
        self
    }

    /// The body's length so far.
    pub fn body_len(&self) -> usize {
        self.bytes.len() - OUT_HEADER_LEN
    }

    /// Cuts the body back to `len` bytes (a directory entry that did not fit).
    pub fn truncate_body(&mut self, len: usize) {
        self.bytes.truncate(OUT_HEADER_LEN + len);
    }

    /// `fuse_attr`, from a host `stat`.
    pub fn attr(&mut self, st: &libc::stat64) -> &mut Self {
        self.u64(st.st_ino)
            .u64(st.st_size as u64)
            .u64(st.st_blocks as u64)
            .u64(st.st_atime as u64)
            .u64(st.st_mtime as u64)
            .u64(st.st_ctime as u64)
            .u32(st.st_atime_nsec as u32)
            .u32(st.st_mtime_nsec as u32)
            .u32(st.st_ctime_nsec as u32)
            .u32(st.st_mode)
            .u32(st.st_nlink as u32)
            .u32(st.st_uid)
            .u32(st.st_gid)
            .u32(st.st_rdev as u32)
            .u32(st.st_blksize as u32)
            .u32(0)
    }

    /// Sets the header's length and returns the bytes.
    pub fn finish(mut self) -> Vec<u8> {
        let len = self.bytes.len() as u32;
        self.bytes[0..4].copy_from_slice(&len.to_le_bytes());
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u32, opcode: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&opcode.to_le_bytes());
        b.extend_from_slice(&7u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&[0u8; 16]);
        b
    }

    #[test]
    fn a_header_is_parsed_and_its_length_checked() {
        let mut req = header(44, opcode::GETATTR);
        req.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        let (h, body) = parse_header(&req).unwrap();
        assert_eq!((h.opcode, h.unique, h.nodeid), (opcode::GETATTR, 7, 1));
        assert_eq!(body, &[1, 2, 3, 4], "the body ends where the header says");

        assert_eq!(parse_header(&req[..39]), Err(ParseError::Short));
        for stated in [0, 39, 47, u32::MAX] {
            let req = header(stated, opcode::GETATTR);
            assert!(matches!(parse_header(&req), Err(ParseError::Length { .. })));
        }
    }

    #[test]
    fn names_must_be_terminated() {
        let mut r = Reader::new(b"abc\0def");
        assert_eq!(r.c_str().unwrap(), b"abc");
        assert_eq!(r.c_str(), Err(ParseError::Short));
        assert_eq!(Reader::new(&[1, 2]).u32(), Err(ParseError::Short));
    }

    #[test]
    fn an_error_reply_carries_a_negative_errno() {
        let r = Reply::error(9, libc::ENOENT);
        assert_eq!(r.len(), OUT_HEADER_LEN);
        assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()), 16);
        assert_eq!(
            i32::from_le_bytes(r[4..8].try_into().unwrap()),
            -libc::ENOENT
        );
        assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), 9);
    }
}
