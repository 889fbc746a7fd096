//! The wire format: every message is an 8-byte header followed by its payload.
//!
//! The header is one little-endian `u64`:
//!
//! | bits   | meaning                                                        |
//! |--------|----------------------------------------------------------------|
//! | 48..64 | magic `0x6770` ("gp"): catches a stream that is out of step    |
//! | 40..48 | payload kind, chosen by the Python layer (see [`Kind`])        |
//! | 0..40  | payload length in bytes (so up to 1 TiB; no 2 GiB cap)         |
//!
//! A corrupt header is reported, never trusted: the reader checks the magic and the kind and
//! compares the length with its configured maximum before it allocates anything.

use std::fmt;

/// Size of a frame header on the wire.
pub const HEADER_LEN: usize = 8;

const MAGIC: u64 = 0x6770;
const MAGIC_SHIFT: u32 = 48;
const KIND_SHIFT: u32 = 40;

/// The largest payload the header can describe.
pub const MAX_PAYLOAD_LEN: u64 = (1 << KIND_SHIFT) - 1;

/// What a payload holds; the Python layer decides how each kind is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Bytes produced by the pipe's encoder (pickle by default).
    Encoded = 0,
    /// A `bytes` object sent as is by the default encoder (no pickling on either side).
    Bytes = 1,
    /// Several messages encoded together by one `put_many` call.
    Batch = 2,
}

impl Kind {
    pub fn from_u8(value: u8) -> Option<Kind> {
        match value {
            0 => Some(Kind::Encoded),
            1 => Some(Kind::Bytes),
            2 => Some(Kind::Batch),
            _ => None,
        }
    }
}

/// A header that cannot be the start of a frame, or a frame the reader refuses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The magic is wrong: the stream is corrupt or was written by something else.
    BadMagic { header: [u8; HEADER_LEN] },
    /// The magic is right but the kind is unknown.
    UnknownKind { kind: u8 },
    /// The announced payload is larger than the reader accepts.
    TooLarge { len: u64, max: u64 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::BadMagic { header } => write!(
                f,
                "corrupt frame header {header:02x?}: the stream is out of step \
                 (was the pipe written to by something other than gipc?)"
            ),
            FrameError::UnknownKind { kind } => {
                write!(f, "corrupt frame header: unknown payload kind {kind}")
            }
            FrameError::TooLarge { len, max } => write!(
                f,
                "incoming message of {len} bytes exceeds this reader's max_message_size \
                 of {max} bytes"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// Builds the header of a frame; `len` must not exceed [`MAX_PAYLOAD_LEN`].
pub fn encode_header(kind: Kind, len: u64) -> Result<[u8; HEADER_LEN], FrameError> {
    if len > MAX_PAYLOAD_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_PAYLOAD_LEN,
        });
    }
    let word = (MAGIC << MAGIC_SHIFT) | ((kind as u64) << KIND_SHIFT) | len;
    Ok(word.to_le_bytes())
}

/// Parses a header, refusing any payload longer than `max_len`.
pub fn decode_header(raw: [u8; HEADER_LEN], max_len: u64) -> Result<(Kind, u64), FrameError> {
    let word = u64::from_le_bytes(raw);
    if word >> MAGIC_SHIFT != MAGIC {
        return Err(FrameError::BadMagic { header: raw });
    }
    let kind_byte = ((word >> KIND_SHIFT) & 0xff) as u8;
    let kind = Kind::from_u8(kind_byte).ok_or(FrameError::UnknownKind { kind: kind_byte })?;
    let len = word & MAX_PAYLOAD_LEN;
    if len > max_len {
        return Err(FrameError::TooLarge { len, max: max_len });
    }
    Ok((kind, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_every_kind() {
        for kind in [Kind::Encoded, Kind::Bytes, Kind::Batch] {
            for len in [0, 1, 100, 1 << 31, (1 << 31) + 1, MAX_PAYLOAD_LEN] {
                let raw = encode_header(kind, len).unwrap();
                assert_eq!(decode_header(raw, u64::MAX).unwrap(), (kind, len));
            }
        }
    }

    #[test]
    fn lengths_above_two_gib_are_representable() {
        let len = 5 * (1u64 << 30);
        let raw = encode_header(Kind::Encoded, len).unwrap();
        assert_eq!(decode_header(raw, len).unwrap().1, len);
    }

    #[test]
    fn encode_refuses_what_the_header_cannot_hold() {
        assert!(matches!(
            encode_header(Kind::Bytes, MAX_PAYLOAD_LEN + 1),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn wrong_magic_is_corrupt() {
        let err = decode_header([0xff; HEADER_LEN], u64::MAX).unwrap_err();
        assert!(matches!(err, FrameError::BadMagic { .. }));
        assert!(err.to_string().contains("corrupt frame header"));
    }

    #[test]
    fn unknown_kind_is_corrupt() {
        let word = (MAGIC << MAGIC_SHIFT) | (7u64 << KIND_SHIFT) | 3;
        let err = decode_header(word.to_le_bytes(), u64::MAX).unwrap_err();
        assert_eq!(err, FrameError::UnknownKind { kind: 7 });
    }

    #[test]
    fn length_above_the_readers_maximum_is_refused() {
        let raw = encode_header(Kind::Encoded, 1001).unwrap();
        let err = decode_header(raw, 1000).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                len: 1001,
                max: 1000
            }
        );
        assert!(err.to_string().contains("max_message_size"));
        assert!(decode_header(raw, 1001).is_ok());
    }
}
