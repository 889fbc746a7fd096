//! The frame decoder against untrusted input, through the crate's public API only.
//!
//! Arbitrary byte streams (pure noise, or noise seeded with plausible headers), valid frames
//! followed by garbage, and valid streams cut short are fed to a [`Receiver`] in arbitrary
//! chunks, with "would block" and yields in between. Whatever the input:
//!
//! * nothing panics (a panic here would be an out-of-bounds access or an overflow in the
//!   decoder: in safe Rust both are checked and panic);
//! * the allocation callback is never asked for more than the `max_len` in force, and no
//!   message is longer than it;
//! * the decoder always makes progress: every poll consumes input, returns a message, or
//!   reports would-block/yield/an error (the driver bounds the number of polls);
//! * valid frames are delivered exactly, in order, up to the first bad header, and nothing
//!   after it; a corrupt stream stays corrupt without reading or allocating again;
//! * a stream cut short ends cleanly at a frame boundary and as "torn" anywhere else, with
//!   the right byte counts.
//!
//! `cargo-fuzz` needs a nightly toolchain; proptest on stable explores the same space with
//! shrinking. `PROPTEST_CASES` scales every property (the defaults keep a debug run of this
//! file within a few seconds).

use std::io;
use std::time::Duration;

use gipc_wire::budget::Budget;
use gipc_wire::frame::{
    decode_header, encode_lane_header, FrameError, Kind, Lane, HEADER_LEN, MAX_PAYLOAD_LEN,
};
use gipc_wire::io::ReadSource;
use gipc_wire::recv::{Event, Payload, Receiver, RecvError};
use proptest::prelude::*;
use proptest::test_runner::Config;

const MAGIC_HIGH: u8 = 0x67;
const MAGIC_LOW: u8 = 0x70;

/// Payload allocations above this are refused by the test's allocator (as a real one may
/// refuse a huge request): keeps a "valid" header announcing a terabyte from exhausting
/// memory, and exercises the allocation-failure path.
const ALLOC_CAP: usize = 8 << 20;

fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        // Failures are reported with their shrunk input; no regression files are written
        // into the source tree.
        failure_persistence: None,
        ..Config::default()
    }
}

fn kind_of(index: u8) -> Kind {
    match index % 3 {
        0 => Kind::Encoded,
        1 => Kind::Bytes,
        _ => Kind::Batch,
    }
}

/// Deterministic bytes for a payload: cheap to make in a debug build, unlike a proptest
/// vector of a hundred thousand elements, and different for every frame.
fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

#[derive(Clone, Debug)]
struct FrameSpec {
    kind: Kind,
    payload: Vec<u8>,
}

impl FrameSpec {
    fn bytes(&self) -> Vec<u8> {
        let mut out = encode_lane_header(self.kind, self.payload.len() as u64, Lane::Frame)
            .expect("test payloads are small")
            .to_vec();
        out.extend_from_slice(&self.payload);
        out
    }
}

/// Payload lengths around the interesting sizes: empty, tiny, around the small/large
/// threshold of the receiver (32 KiB) and beyond its read buffer (256 KiB).
fn payload_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..64,
        2 => 64usize..4096,
        2 => 32_760usize..32_780,
        1 => 32_780usize..100_000,
        1 => 250_000usize..300_000,
    ]
}

fn frame_spec() -> impl Strategy<Value = FrameSpec> {
    (any::<u8>(), payload_len(), any::<u32>()).prop_map(|(kind, len, seed)| FrameSpec {
        kind: kind_of(kind),
        payload: pattern(seed, len),
    })
}

fn frames(max: usize) -> impl Strategy<Value = Vec<FrameSpec>> {
    proptest::collection::vec(frame_spec(), 0..max)
}

/// How the source serves its bytes: chunk sizes (cycled), and whether a read says "would
/// block" first (cycled; a stall is always followed by a read that serves data).
#[derive(Clone, Debug)]
struct Schedule {
    chunks: Vec<usize>,
    stalls: Vec<bool>,
    yields: bool,
}

fn schedule() -> impl Strategy<Value = Schedule> {
    let chunk = prop_oneof![
        3 => 1usize..16,
        3 => 1usize..4096,
        2 => 4096usize..300_000,
        1 => Just(usize::MAX),
    ];
    (
        proptest::collection::vec(chunk, 1..8),
        proptest::collection::vec(any::<bool>(), 1..8),
        any::<bool>(),
    )
        .prop_map(|(chunks, stalls, yields)| Schedule {
            chunks,
            stalls,
            yields,
        })
}

/// A byte stream served by a test-chosen schedule. At its end it says EOF (the writer
/// closed) or "would block" (the writer is idle), as the test asks.
struct ScheduledSource<'a> {
    data: &'a [u8],
    pos: usize,
    schedule: &'a Schedule,
    turn: usize,
    just_stalled: bool,
    eof_at_end: bool,
    reads: usize,
}

impl<'a> ScheduledSource<'a> {
    fn new(data: &'a [u8], schedule: &'a Schedule, eof_at_end: bool) -> Self {
        ScheduledSource {
            data,
            pos: 0,
            schedule,
            turn: 0,
            just_stalled: false,
            eof_at_end,
            reads: 0,
        }
    }

    fn drained(&self) -> bool {
        self.pos == self.data.len()
    }
}

impl ReadSource for ScheduledSource<'_> {
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // A zero-length read would return 0, which means end of stream: the receiver must
        // never offer an empty buffer.
        assert!(!buf.is_empty(), "the receiver offered an empty read buffer");
        self.reads += 1;
        if self.drained() {
            return if self.eof_at_end {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let turn = self.turn;
        self.turn += 1;
        let stalls = &self.schedule.stalls;
        if !self.just_stalled && stalls[turn % stalls.len()] {
            self.just_stalled = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.just_stalled = false;
        // Chunks grow as the stream goes on, so that a long stream served byte by byte
        // still takes a bounded number of reads.
        let chunks = &self.schedule.chunks;
        let n = chunks[turn % chunks.len()]
            .saturating_mul(1 << (turn / 512).min(16))
            .min(buf.len())
            .min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// How a run ended.
#[derive(Debug)]
enum End {
    /// Would block with every byte consumed (the writer is idle).
    Idle,
    Error(RecvError),
}

struct Run {
    messages: Vec<(Kind, Vec<u8>)>,
    allocations: Vec<usize>,
    end: End,
}

/// Polls until the stream is used up or an error ends it, checking on every poll that the
/// decoder allocates and delivers no more than the maximum in force. `max_lens` is cycled
/// through, one value per poll, to also cover a maximum changed between two polls.
fn drive(stream: &[u8], schedule: &Schedule, max_lens: &[u64], eof_at_end: bool) -> Run {
    let budget = Budget::new(schedule.yields.then_some(Duration::ZERO));
    let mut rx: Receiver<Vec<u8>> = Receiver::new(max_lens[0], budget);
    let mut src = ScheduledSource::new(stream, schedule, eof_at_end);
    let mut messages = Vec::new();
    let mut allocations = Vec::new();
    // Generous: each byte may cost a read, a stall and a yield; each frame a few more polls.
    let poll_limit = 64 + 8 * stream.len();
    let largest_max = *max_lens.iter().max().expect("at least one max_len");
    for poll in 0..poll_limit {
        let max = max_lens[poll % max_lens.len()];
        rx.set_max_len(max);
        assert_eq!(rx.max_len(), max);
        let event = rx.poll_lanes(&mut src, None::<&mut ScheduledSource>, |len| {
            assert!(
                len as u64 <= max,
                "asked to allocate {len} bytes with max_len {max}"
            );
            allocations.push(len);
            (len <= ALLOC_CAP).then(|| vec![0xA5; len])
        });
        match event {
            Ok(Event::Message { kind, payload }) => {
                let bytes = match payload {
                    Payload::Buffered(slice) => slice.to_vec(),
                    Payload::Owned(vec) => vec,
                };
                // The maximum is checked when the header is read; a large frame already
                // accepted is completed even if the maximum shrinks before its end.
                assert!(
                    bytes.len() as u64 <= largest_max,
                    "message above every max_len"
                );
                messages.push((kind, bytes));
            }
            Ok(Event::Yield) => {}
            Ok(Event::WouldBlock) => {
                if src.drained() && !eof_at_end {
                    return Run {
                        messages,
                        allocations,
                        end: End::Idle,
                    };
                }
            }
            Err(err) => {
                return Run {
                    messages,
                    allocations,
                    end: End::Error(err),
                };
            }
        }
    }
    panic!(
        "no end after {poll_limit} polls of a {}-byte stream",
        stream.len()
    );
}

/// Asserts that a receiver whose stream is corrupt keeps saying so without touching the
/// source or the allocator again.
fn assert_corrupt_for_good(stream: &[u8], schedule: &Schedule, max_len: u64) {
    let mut rx: Receiver<Vec<u8>> = Receiver::new(max_len, Budget::new(None));
    let mut src = ScheduledSource::new(stream, schedule, true);
    let first = loop {
        match rx.poll_lanes(&mut src, None::<&mut ScheduledSource>, |len| {
            (len <= ALLOC_CAP).then(|| vec![0; len])
        }) {
            Ok(_) => continue,
            Err(err) => break err,
        }
    };
    let RecvError::Frame(expected) = first else {
        return;
    };
    let reads = src.reads;
    for _ in 0..3 {
        match rx.poll_lanes(&mut src, None::<&mut ScheduledSource>, |_| {
            panic!("a corrupt stream must not allocate")
        }) {
            Err(RecvError::Frame(again)) => assert_eq!(again, expected),
            other => panic!("corrupt stream recovered: {other:?}"),
        }
    }
    assert_eq!(src.reads, reads, "a corrupt stream was read again");
}

/// A piece of an untrusted stream: noise, or a header with the right magic (so the kind
/// and length checks are reached) and whatever follows it.
fn noise_piece() -> impl Strategy<Value = Vec<u8>> {
    let noise = proptest::collection::vec(any::<u8>(), 0..512);
    let length = prop_oneof![
        any::<u64>().prop_map(|v| v & MAX_PAYLOAD_LEN),
        0u64..70_000,
        Just(MAX_PAYLOAD_LEN),
    ];
    let plausible = (
        // Plain kinds, and kinds flagged "payload on the bulk lane".
        prop_oneof![0u8..6, 0x80u8..0x86],
        length,
        proptest::collection::vec(any::<u8>(), 0..256),
    )
        .prop_map(|(kind, len, tail)| {
            let mut out = len.to_le_bytes().to_vec();
            out[5] = kind;
            out[6] = MAGIC_LOW;
            out[7] = MAGIC_HIGH;
            out.extend(tail);
            out
        });
    prop_oneof![noise, plausible, frame_spec().prop_map(|f| f.bytes())]
}

fn max_len() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        0u64..100,
        32_000u64..33_000,
        Just(1 << 16),
        Just(1 << 20),
        Just(4 << 30),
        Just(u64::MAX),
    ]
}

#[derive(Clone, Copy, Debug)]
enum Garbage {
    BadMagic,
    UnknownKind,
    TooLarge,
}

fn garbage_header(mode: Garbage, noise: [u8; 8], max_len: u64) -> [u8; HEADER_LEN] {
    let mut raw = noise;
    match mode {
        Garbage::BadMagic => {
            if raw[6] == MAGIC_LOW && raw[7] == MAGIC_HIGH {
                raw[7] ^= 0x80;
            }
        }
        Garbage::UnknownKind => {
            raw[5] = 4 + raw[5] % 252;
            raw[6] = MAGIC_LOW;
            raw[7] = MAGIC_HIGH;
        }
        Garbage::TooLarge => {
            let span = MAX_PAYLOAD_LEN - max_len;
            let len = max_len + 1 + u64::from_le_bytes(noise) % span;
            raw = encode_lane_header(kind_of(noise[0]), len, Lane::Frame)
                .expect("len fits the header");
        }
    }
    raw
}

fn expected_prefix(frames: &[FrameSpec]) -> Vec<(Kind, Vec<u8>)> {
    frames.iter().map(|f| (f.kind, f.payload.clone())).collect()
}

/// [`drive`] for a channel with a bulk lane: untrusted bytes on both descriptors.
fn drive_lanes(frames: &[u8], bulk: &[u8], schedule: &Schedule, max_len: u64, eof: bool) -> Run {
    let budget = Budget::new(schedule.yields.then_some(Duration::ZERO));
    let mut rx: Receiver<Vec<u8>> = Receiver::new(max_len, budget);
    let mut src = ScheduledSource::new(frames, schedule, eof);
    let mut bulk_src = ScheduledSource::new(bulk, schedule, eof);
    let mut messages = Vec::new();
    let mut allocations = Vec::new();
    let poll_limit = 64 + 8 * (frames.len() + bulk.len());
    for _ in 0..poll_limit {
        let event = rx.poll_lanes(&mut src, Some(&mut bulk_src), |len| {
            assert!(
                len as u64 <= max_len,
                "asked to allocate {len} bytes, max {max_len}"
            );
            allocations.push(len);
            (len <= ALLOC_CAP).then(|| vec![0xA5; len])
        });
        match event {
            Ok(Event::Message { kind, payload }) => {
                let bytes = match payload {
                    Payload::Buffered(slice) => slice.to_vec(),
                    Payload::Owned(vec) => vec,
                };
                assert!(bytes.len() as u64 <= max_len, "message above max_len");
                messages.push((kind, bytes));
            }
            Ok(Event::Yield) => {}
            Ok(Event::WouldBlock) => {
                // Idle once the lane it waits on has nothing more to give.
                let waited = match rx.waiting_lane() {
                    Lane::Frame => &src,
                    Lane::Bulk => &bulk_src,
                };
                if waited.drained() && !eof {
                    return Run {
                        messages,
                        allocations,
                        end: End::Idle,
                    };
                }
            }
            Err(err) => {
                return Run {
                    messages,
                    allocations,
                    end: End::Error(err),
                };
            }
        }
    }
    panic!("no end after {poll_limit} polls");
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn untrusted_bytes_on_both_lanes_never_panic_over_allocate_or_stall(
        frame_pieces in proptest::collection::vec(noise_piece(), 0..8),
        bulk_pieces in proptest::collection::vec(noise_piece(), 0..4),
        schedule in schedule(),
        max_len in max_len(),
        eof_at_end in any::<bool>(),
    ) {
        let frames: Vec<u8> = frame_pieces.concat();
        let bulk: Vec<u8> = bulk_pieces.concat();
        let run = drive_lanes(&frames, &bulk, &schedule, max_len, eof_at_end);
        for &len in &run.allocations {
            prop_assert!(len as u64 <= max_len);
        }
        if let End::Error(RecvError::Alloc { len }) = run.end {
            prop_assert!(len as usize > ALLOC_CAP);
        }
        prop_assert!(!matches!(run.end, End::Error(RecvError::Io(_))));
    }
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn untrusted_streams_never_panic_over_allocate_or_stall(
        pieces in proptest::collection::vec(noise_piece(), 0..8),
        schedule in schedule(),
        max_lens in proptest::collection::vec(max_len(), 1..4),
        eof_at_end in any::<bool>(),
    ) {
        let stream: Vec<u8> = pieces.concat();
        let run = drive(&stream, &schedule, &max_lens, eof_at_end);
        for &len in &run.allocations {
            prop_assert!(max_lens.iter().any(|&m| len as u64 <= m));
        }
        if let End::Error(RecvError::Alloc { len }) = run.end {
            prop_assert!(len as usize > ALLOC_CAP);
        }
        prop_assert!(!matches!(run.end, End::Error(RecvError::Io(_))));
        if max_lens.len() == 1 {
            assert_corrupt_for_good(&stream, &schedule, max_lens[0]);
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn valid_frames_then_garbage_decode_up_to_the_garbage(
        before in frames(6),
        mode in prop_oneof![
            Just(Garbage::BadMagic), Just(Garbage::UnknownKind), Just(Garbage::TooLarge)
        ],
        noise in any::<[u8; 8]>(),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
        after in frames(3),
        schedule in schedule(),
    ) {
        let max_len = 300_000u64;
        let mut stream: Vec<u8> = before.iter().flat_map(FrameSpec::bytes).collect();
        stream.extend(garbage_header(mode, noise, max_len));
        stream.extend(&tail);
        for frame in &after {
            stream.extend(frame.bytes());
        }
        let run = drive(&stream, &schedule, &[max_len], true);
        prop_assert_eq!(run.messages, expected_prefix(&before));
        let End::Error(RecvError::Frame(err)) = run.end else {
            return Err(TestCaseError::fail(format!("ended with {:?}", run.end)));
        };
        match (mode, err) {
            (Garbage::BadMagic, FrameError::BadMagic { .. })
            | (Garbage::UnknownKind, FrameError::UnknownKind { .. }) => {}
            (Garbage::TooLarge, FrameError::TooLarge { len, max }) => {
                prop_assert!(len > max && max == max_len);
            }
            (mode, err) => prop_assert!(false, "{:?} garbage reported as {:?}", mode, err),
        }
        // Only the frames before the garbage were ever allocated for.
        let large_before = before.iter().filter(|f| f.payload.len() > 32 * 1024).count();
        prop_assert_eq!(run.allocations.len(), large_before);
    }

    #[test]
    fn streams_cut_short_end_at_a_boundary_or_torn(
        frames in frames(6),
        cut_at in any::<prop::sample::Index>(),
        schedule in schedule(),
    ) {
        let stream: Vec<u8> = frames.iter().flat_map(FrameSpec::bytes).collect();
        let cut = cut_at.index(stream.len() + 1);
        let run = drive(&stream[..cut], &schedule, &[u64::MAX], true);
        // Which frame the cut falls in, and how far into it.
        let mut start = 0;
        let mut whole = 0;
        for frame in &frames {
            let end = start + HEADER_LEN + frame.payload.len();
            if end > cut {
                break;
            }
            start = end;
            whole += 1;
        }
        prop_assert_eq!(run.messages, expected_prefix(&frames[..whole]));
        let into = (cut - start) as u64;
        match run.end {
            End::Error(RecvError::Eof) => prop_assert_eq!(into, 0),
            End::Error(RecvError::Torn { received, expected: None }) => {
                prop_assert!(into > 0 && into < HEADER_LEN as u64);
                prop_assert_eq!(received, into);
            }
            End::Error(RecvError::Torn { received, expected: Some(len) }) => {
                prop_assert_eq!(len, frames[whole].payload.len() as u64);
                prop_assert_eq!(received, into - HEADER_LEN as u64);
                prop_assert!(received < len);
            }
            other => prop_assert!(false, "cut at {} ended with {:?}", cut, other),
        }
    }

    #[test]
    fn valid_streams_round_trip_under_any_schedule(
        frames in frames(8),
        schedule in schedule(),
        eof_at_end in any::<bool>(),
    ) {
        let stream: Vec<u8> = frames.iter().flat_map(FrameSpec::bytes).collect();
        let run = drive(&stream, &schedule, &[u64::MAX], eof_at_end);
        prop_assert_eq!(run.messages, expected_prefix(&frames));
        if eof_at_end {
            prop_assert!(matches!(run.end, End::Error(RecvError::Eof)), "{:?}", run.end);
        } else {
            prop_assert!(matches!(run.end, End::Idle), "{:?}", run.end);
        }
    }
}

fn small_frame_spec() -> impl Strategy<Value = FrameSpec> {
    (any::<u8>(), 0usize..4000, any::<u32>()).prop_map(|(kind, len, seed)| FrameSpec {
        kind: kind_of(kind),
        payload: pattern(seed, len),
    })
}

proptest! {
    #![proptest_config(config(32))]

    /// Enough small frames to wrap the receiver's 256 KiB read buffer several times, so the
    /// partial frame at its end must be moved to the front (and the next read must still
    /// have room).
    #[test]
    fn many_small_frames_wrap_the_read_buffer(
        frames in proptest::collection::vec(small_frame_spec(), 100..600),
        schedule in schedule(),
        eof_at_end in any::<bool>(),
    ) {
        let stream: Vec<u8> = frames.iter().flat_map(FrameSpec::bytes).collect();
        let run = drive(&stream, &schedule, &[4000], eof_at_end);
        prop_assert_eq!(run.messages, expected_prefix(&frames));
        prop_assert!(run.allocations.is_empty());
    }
}

proptest! {
    #![proptest_config(config(20_000))]

    #[test]
    fn header_decoding_is_total_and_canonical(
        raw in any::<[u8; 8]>(),
        max in max_len(),
        bulk_lane in any::<bool>(),
    ) {
        let word = u64::from_le_bytes(raw);
        match decode_header(raw, max, bulk_lane) {
            Ok((kind, len, lane)) => {
                prop_assert!(len <= max && len <= MAX_PAYLOAD_LEN);
                prop_assert!(bulk_lane || lane == Lane::Frame);
                prop_assert_eq!(encode_lane_header(kind, len, lane).unwrap(), raw);
            }
            Err(FrameError::BadMagic { header }) => {
                prop_assert_ne!(word >> 48, 0x6770);
                prop_assert_eq!(header, raw);
            }
            Err(FrameError::UnknownKind { kind }) => {
                prop_assert_eq!(word >> 48, 0x6770);
                let plain = if bulk_lane { kind & 0x7f } else { kind };
                prop_assert!(plain > 3);
            }
            Err(FrameError::TooLarge { len, max: reported }) => {
                prop_assert_eq!(reported, max);
                prop_assert!(len > max);
                prop_assert_eq!(len, word & MAX_PAYLOAD_LEN);
            }
        }
    }
}
