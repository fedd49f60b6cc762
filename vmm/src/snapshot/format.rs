//! The snapshot's state file on disk: a fixed header, then the state encoded with postcard
//! (serde, compact, no schema in the file).
//!
//! ```text
//! offset  size  field
//!      0     8  magic "COCOONSS"
//!      8     4  format version (little endian)
//!     12     4  CRC-32 of the payload
//!     16     8  payload length
//!     24     n  payload
//! ```
//!
//! The format version is ours, not the crate's: it changes when the encoded state changes, and
//! a file of any other version is refused rather than half-understood.

use serde::Serialize;
use serde::de::DeserializeOwned;

pub const MAGIC: &[u8; 8] = b"COCOONSS";
/// Bump when any saved struct changes shape.
pub const FORMAT_VERSION: u32 = 3;
const HEADER_LEN: usize = 24;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a cocoon snapshot (bad magic)")]
    Magic,
    #[error("snapshot format version {found}, this cocoon-vmm reads version {FORMAT_VERSION}")]
    Version { found: u32 },
    #[error("snapshot is truncated: {have} bytes, {want} expected")]
    Truncated { have: usize, want: usize },
    #[error("snapshot has {0} trailing bytes after its state")]
    Trailing(usize),
    #[error("snapshot is corrupted (checksum mismatch)")]
    Checksum,
    #[error("snapshot state cannot be decoded: {0}")]
    Decode(String),
    #[error("snapshot state cannot be encoded: {0}")]
    Encode(String),
}

pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, FormatError> {
    let payload = postcard::to_stdvec(state).map_err(|e| FormatError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

fn field<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
    if bytes.len() < HEADER_LEN {
        return if bytes.len() >= MAGIC.len() && &bytes[..MAGIC.len()] != MAGIC {
            Err(FormatError::Magic)
        } else {
            Err(FormatError::Truncated {
                have: bytes.len(),
                want: HEADER_LEN,
            })
        };
    }
    if &bytes[..8] != MAGIC {
        return Err(FormatError::Magic);
    }
    let version = u32::from_le_bytes(field(bytes, 8));
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version });
    }
    let crc = u32::from_le_bytes(field(bytes, 12));
    let len = u64::from_le_bytes(field(bytes, 16));
    let have = bytes.len() - HEADER_LEN;
    let want = usize::try_from(len).unwrap_or(usize::MAX);
    if have < want {
        return Err(FormatError::Truncated {
            have: bytes.len(),
            want: HEADER_LEN.saturating_add(want),
        });
    }
    if have > want {
        return Err(FormatError::Trailing(have - want));
    }
    let payload = &bytes[HEADER_LEN..];
    if crc32fast::hash(payload) != crc {
        return Err(FormatError::Checksum);
    }
    postcard::from_bytes(payload).map_err(|e| FormatError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        values: Vec<u64>,
    }

    fn sample() -> Vec<u8> {
        encode(&Sample {
            name: "vm".into(),
            values: vec![1, 2, 3],
        })
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let back: Sample = decode(&sample()).unwrap();
        assert_eq!(back.values, vec![1, 2, 3]);
    }

    #[test]
    fn every_damage_is_one_clear_error() {
        let good = sample();
        let mut other_version = good.clone();
        other_version[8] = 9;
        assert_eq!(
            decode::<Sample>(&other_version).unwrap_err(),
            FormatError::Version { found: 9 }
        );
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        assert_eq!(
            decode::<Sample>(&flipped).unwrap_err(),
            FormatError::Checksum
        );
        for cut in [0, 5, 23, good.len() - 1] {
            assert!(
                matches!(
                    decode::<Sample>(&good[..cut]).unwrap_err(),
                    FormatError::Truncated { .. }
                ),
                "cut at {cut}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(
            decode::<Sample>(&longer).unwrap_err(),
            FormatError::Trailing(1)
        );
        let mut magic = good.clone();
        magic[0] = b'X';
        assert_eq!(decode::<Sample>(&magic).unwrap_err(), FormatError::Magic);
        // A valid frame around a payload of the wrong shape decodes to an error, not a panic.
        let wrong = encode(&(7u8, "x")).unwrap();
        assert!(matches!(
            decode::<Sample>(&wrong).unwrap_err(),
            FormatError::Decode(_)
        ));
    }
}
