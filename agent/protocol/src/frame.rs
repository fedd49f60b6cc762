//! Framing: every message is a 4-byte big-endian length followed by that many bytes of JSON.
//! The length is checked against [`MAX_FRAME`] before anything is allocated, so a peer cannot
//! make the other side reserve memory it did not send.

use std::io::{Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest frame either side accepts. An OCI spec with Docker's default seccomp profile is
/// about 30 KiB; this leaves room without letting a peer pin much memory.
pub const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes `message` as one frame.
pub fn write_frame<W: Write, T: Serialize>(writer: &mut W, message: &T) -> Result<(), FrameError> {
    let body = serde_json::to_vec(message)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    writer.write_all(&frame)?;
    writer.flush()?;
    Ok(())
}

/// Reads one frame's bytes. EOF before the first header byte is [`FrameError::Closed`]; EOF
/// inside a frame is an i/o error.
pub fn read_frame_bytes<R: Read>(reader: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        match reader.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    Ok(body)
}

/// Reads one frame and decodes it as `T`.
pub fn read_frame<R: Read, T: DeserializeOwned>(reader: &mut R) -> Result<T, FrameError> {
    let body = read_frame_bytes(reader)?;
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &vec!["a", "b"]).unwrap();
        assert_eq!(&buf[..4], &9u32.to_be_bytes());
        let back: Vec<String> = read_frame(&mut &buf[..]).unwrap();
        assert_eq!(back, ["a", "b"]);
    }

    #[test]
    fn clean_eof_is_closed_and_torn_frames_are_errors() {
        assert!(matches!(
            read_frame_bytes(&mut &[][..]),
            Err(FrameError::Closed)
        ));
        assert!(matches!(
            read_frame_bytes(&mut &[0u8, 0][..]),
            Err(FrameError::Io(_))
        ));
        assert!(matches!(
            read_frame_bytes(&mut &[0u8, 0, 0, 5, b'{'][..]),
            Err(FrameError::Io(_))
        ));
    }

    #[test]
    fn oversized_header_is_refused_before_allocating() {
        let header = u32::MAX.to_be_bytes();
        assert!(matches!(
            read_frame_bytes(&mut &header[..]),
            Err(FrameError::TooLarge(n)) if n == u32::MAX as usize
        ));
    }

    #[test]
    fn garbage_is_malformed() {
        let mut buf = 3u32.to_be_bytes().to_vec();
        buf.extend_from_slice(b"{x]");
        assert!(matches!(
            read_frame::<_, Vec<u8>>(&mut &buf[..]),
            Err(FrameError::Malformed(_))
        ));
    }
}
