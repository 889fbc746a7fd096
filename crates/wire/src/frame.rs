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
//! The top bit of the kind byte says which lane carries the payload (see [`Lane`]).
//!
//! A corrupt header is reported, never trusted: the reader checks the magic and the kind and
//! compares the length with its configured maximum before it allocates anything.

use std::fmt;

/// Size of a frame header on the wire.
pub const HEADER_LEN: usize = 8;

const MAGIC: u64 = 0x6770;
const MAGIC_SHIFT: u32 = 48;
const KIND_SHIFT: u32 = 40;

/// Set in the kind byte when the payload follows on the bulk lane.
const BULK_FLAG: u8 = 0x80;

/// Which descriptor carries a frame's payload. Headers always travel on the frame lane, in
/// order; a payload is either right behind its header there, or, for a channel that has a
/// bulk lane, on that lane, where the reader fetches it before it reads the next header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Frame,
    Bulk,
}

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
    /// A message that carries descriptors (`SCM_RIGHTS`, see `send::Sender::push_with_fds`):
    /// its payload starts with their count, a little-endian `u32`.
    Handles = 3,
}

impl Kind {
    pub fn from_u8(value: u8) -> Option<Kind> {
        match value {
            0 => Some(Kind::Encoded),
            1 => Some(Kind::Bytes),
            2 => Some(Kind::Batch),
            3 => Some(Kind::Handles),
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

/// Builds the header of a frame whose payload travels on `lane` (right behind the header
/// on the frame lane, or on the bulk lane); `len` must not exceed [`MAX_PAYLOAD_LEN`].
pub fn encode_lane_header(
    kind: Kind,
    len: u64,
    lane: Lane,
) -> Result<[u8; HEADER_LEN], FrameError> {
    if len > MAX_PAYLOAD_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_PAYLOAD_LEN,
        });
    }
    let flag = match lane {
        Lane::Frame => 0,
        Lane::Bulk => BULK_FLAG,
    };
    let kind_byte = u64::from(kind as u8 | flag);
    let word = (MAGIC << MAGIC_SHIFT) | (kind_byte << KIND_SHIFT) | len;
    Ok(word.to_le_bytes())
}

/// Parses a header, refusing any payload longer than `max_len`, and a bulk-lane payload
/// unless `bulk_lane` says the channel has one.
pub fn decode_header(
    raw: [u8; HEADER_LEN],
    max_len: u64,
    bulk_lane: bool,
) -> Result<(Kind, u64, Lane), FrameError> {
    let word = u64::from_le_bytes(raw);
    if word >> MAGIC_SHIFT != MAGIC {
        return Err(FrameError::BadMagic { header: raw });
    }
    let kind_byte = ((word >> KIND_SHIFT) & 0xff) as u8;
    let lane = if kind_byte & BULK_FLAG != 0 && bulk_lane {
        Lane::Bulk
    } else {
        Lane::Frame
    };
    let plain = if bulk_lane {
        kind_byte & !BULK_FLAG
    } else {
        kind_byte
    };
    let kind = Kind::from_u8(plain).ok_or(FrameError::UnknownKind { kind: kind_byte })?;
    let len = word & MAX_PAYLOAD_LEN;
    if len > max_len {
        return Err(FrameError::TooLarge { len, max: max_len });
    }
    Ok((kind, len, lane))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_every_kind() {
        for kind in [Kind::Encoded, Kind::Bytes, Kind::Batch, Kind::Handles] {
            for len in [0, 1, 100, 1 << 31, (1 << 31) + 1, MAX_PAYLOAD_LEN] {
                let raw = encode_lane_header(kind, len, Lane::Frame).unwrap();
                for bulk_lane in [false, true] {
                    assert_eq!(
                        decode_header(raw, u64::MAX, bulk_lane).unwrap(),
                        (kind, len, Lane::Frame)
                    );
                }
                let raw = encode_lane_header(kind, len, Lane::Bulk).unwrap();
                assert_eq!(
                    decode_header(raw, u64::MAX, true).unwrap(),
                    (kind, len, Lane::Bulk)
                );
            }
        }
    }

    #[test]
    fn lengths_above_two_gib_are_representable() {
        let len = 5 * (1u64 << 30);
        let raw = encode_lane_header(Kind::Encoded, len, Lane::Frame).unwrap();
        assert_eq!(decode_header(raw, len, false).unwrap().1, len);
    }

    #[test]
    fn encode_refuses_what_the_header_cannot_hold() {
        assert!(matches!(
            encode_lane_header(Kind::Bytes, MAX_PAYLOAD_LEN + 1, Lane::Frame),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn wrong_magic_is_corrupt() {
        let err = decode_header([0xff; HEADER_LEN], u64::MAX, true).unwrap_err();
        assert!(matches!(err, FrameError::BadMagic { .. }));
        assert!(err.to_string().contains("corrupt frame header"));
    }

    #[test]
    fn unknown_kind_is_corrupt() {
        let word = (MAGIC << MAGIC_SHIFT) | (7u64 << KIND_SHIFT) | 3;
        let err = decode_header(word.to_le_bytes(), u64::MAX, true).unwrap_err();
        assert_eq!(err, FrameError::UnknownKind { kind: 7 });
    }

    #[test]
    fn a_bulk_payload_is_corrupt_on_a_channel_without_a_bulk_lane() {
        let raw = encode_lane_header(Kind::Bytes, 10, Lane::Bulk).unwrap();
        let err = decode_header(raw, u64::MAX, false).unwrap_err();
        assert_eq!(err, FrameError::UnknownKind { kind: 0x81 });
    }

    #[test]
    fn length_above_the_readers_maximum_is_refused() {
        let raw = encode_lane_header(Kind::Encoded, 1001, Lane::Frame).unwrap();
        let err = decode_header(raw, 1000, false).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                len: 1001,
                max: 1000
            }
        );
        assert!(err.to_string().contains("max_message_size"));
        assert!(decode_header(raw, 1001, false).is_ok());
    }
}
