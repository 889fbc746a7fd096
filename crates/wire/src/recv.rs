//! The receiving half of a channel: turns a byte stream into frames, without ever waiting.
//!
//! Small frames are served from one read buffer, so a single `read` can deliver hundreds of
//! messages. A large payload goes straight into its final buffer (in the extension, the
//! `bytes` object handed to Python), so it is copied once, by the kernel.

use std::fmt;
use std::io;
use std::ops::Range;
use std::time::Instant;

use std::os::fd::BorrowedFd;

use crate::aside::{AsideRead, End, Finished};
use crate::budget::{Budget, BUFFERED_WEIGHT, SYSCALL_WEIGHT};
use crate::frame::{decode_header, encode_lane_header, FrameError, Kind, Lane, HEADER_LEN};
use crate::io::{ReadSource, MAX_IO_CHUNK};
use crate::memory::HugePages;

/// Size of the read buffer that small frames are served from.
pub const READ_BUFFER: usize = 256 * 1024;

/// Payloads up to this size are copied out of the read buffer; larger ones are read directly
/// into a buffer of their own.
pub const SMALL_PAYLOAD: usize = 32 * 1024;

/// A read into the buffer of less than this says the lane had little in it (see
/// [`Receiver::caught_up`]). A stream of payloads of 4 KiB or more counts as caught up only
/// when one of them arrives in pieces and its last piece is short: one pause, now and then.
pub const SHORT_READ: usize = 4 * 1024;

/// A buffer that a large payload is read into. Its bytes stay at the same address for the
/// buffer's whole life, wherever the value itself moves (a thread may be filling them, see
/// [`Receiver::start_aside`]).
pub trait PayloadBuf {
    fn as_mut_slice(&mut self) -> &mut [u8];
}

impl PayloadBuf for Vec<u8> {
    fn as_mut_slice(&mut self) -> &mut [u8] {
        self
    }
}

/// What one call to [`Receiver::poll_lanes`] produced.
#[derive(Debug)]
pub enum Event<'a, B> {
    /// A whole message.
    Message { kind: Kind, payload: Payload<'a, B> },
    /// Nothing complete and nothing to read: wait until the descriptor is readable.
    WouldBlock,
    /// The time slice is used up while data keeps coming: give the event loop a turn, then
    /// poll again (nothing is lost; the descriptor may not become readable again).
    Yield,
}

/// A message's payload, either borrowed from the read buffer or in its own buffer.
#[derive(Debug)]
pub enum Payload<'a, B> {
    Buffered(&'a [u8]),
    Owned(B),
}

#[derive(Debug)]
pub enum RecvError {
    /// The stream ended cleanly, between two frames.
    Eof,
    /// The stream ended inside a frame. `expected` is `None` while the header was incomplete
    /// (then `received` counts header bytes), else the payload length.
    Torn {
        received: u64,
        expected: Option<u64>,
    },
    /// A header that cannot be trusted. The stream is out of step for good.
    Frame(FrameError),
    /// The payload's buffer could not be allocated.
    Alloc {
        len: u64,
    },
    /// This process was forked while a thread read a payload into this receiver: the bytes
    /// that thread read last are in the parent's copy only. The stream is lost here for good.
    LostAtFork,
    Io(io::Error),
}

impl fmt::Display for RecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecvError::Eof => write!(f, "end of stream: every write end of the pipe is closed"),
            RecvError::Torn {
                received,
                expected: None,
            } => write!(
                f,
                "message torn: the write end was closed after {received} of the \
                 {HEADER_LEN} header bytes (did the writer die mid-message?)"
            ),
            RecvError::Torn {
                received,
                expected: Some(len),
            } => write!(
                f,
                "message torn: the write end was closed after {received} of {len} payload \
                 bytes (did the writer die mid-message?)"
            ),
            RecvError::Frame(err) => err.fmt(f),
            RecvError::Alloc { len } => {
                write!(f, "cannot allocate {len} bytes for an incoming message")
            }
            RecvError::LostAtFork => write!(
                f,
                "this process was forked while a thread read a message into this reader: \
                 the rest of the stream is lost here (it goes on in the parent)"
            ),
            RecvError::Io(err) => err.fmt(f),
        }
    }
}

impl std::error::Error for RecvError {}

struct LargeFrame<B> {
    /// The thread reading the rest of the payload, if one does. Declared before `payload`
    /// so that it is dropped (stopped and joined) before the buffer it writes to.
    aside: Option<AsideRead>,
    /// Read on the caller's thread from now on: a thread could not be started, or one
    /// ended without the whole payload.
    no_aside: bool,
    /// The process forked while a thread read this payload, and this is the child: bytes
    /// the thread read after its last report are lost here, so every poll fails.
    lost: bool,
    kind: Kind,
    payload: B,
    len: usize,
    filled: usize,
    /// Where the rest of the payload comes from.
    lane: Lane,
    /// The huge-page hint on a fresh large buffer, followed as it fills (see `memory`).
    pages: Option<HugePages>,
}

/// What one step of the state machine found; owns no borrow, so `poll` can loop.
enum Step<B> {
    Again,
    Buffered(Kind, Range<usize>),
    Owned(Kind, B),
    WouldBlock,
    Yield,
}

pub struct Receiver<B> {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    large: Option<LargeFrame<B>>,
    max_len: u64,
    budget: Budget,
    corrupt: Option<FrameError>,
    /// Whether a large payload's rest may be read aside (see [`Receiver::wants_aside`]).
    aside: bool,
    /// Whether the last read into `buf` brought less than [`SHORT_READ`] bytes (see
    /// [`Receiver::caught_up`]).
    short_read: bool,
}

impl<B: PayloadBuf> Receiver<B> {
    pub fn new(max_len: u64, budget: Budget) -> Self {
        Receiver {
            buf: vec![0; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            large: None,
            max_len,
            budget,
            corrupt: None,
            aside: false,
            short_read: false,
        }
    }

    /// Lets the rest of a large payload be read on a thread of its own (see `aside`), once
    /// the caller asks for it ([`Receiver::start_aside`]).
    pub fn set_read_aside(&mut self, aside: bool) {
        self.aside = aside;
    }

    pub fn read_aside(&self) -> bool {
        self.aside
    }

    /// Whether this receiver keeps up with a writer of small messages: it has handed out
    /// everything it read, and its last read was short, so the lane was all but empty.
    /// A reader in the middle of a stream then lets a few messages gather before it reads
    /// again ([`crate::spin::SpinPolicy::pause_in_stream`]).
    pub fn caught_up(&self) -> bool {
        self.short_read && self.start == self.end && self.large.is_none()
    }

    /// Whether the payload in progress should be read aside now: the caller that is about
    /// to wait starts that with [`Receiver::start_aside`] and waits for
    /// [`Receiver::aside_fd`] instead of the lane. Until it does, polls answer "would
    /// block" and read nothing (a caller that never waits, and then never polls again,
    /// leaves the bytes in the lane, where the next receiver finds them).
    pub fn wants_aside(&self) -> bool {
        self.large
            .as_ref()
            .is_some_and(|large| Self::aside_wanted(self.aside, large))
    }

    fn aside_wanted(enabled: bool, large: &LargeFrame<B>) -> bool {
        enabled
            && large.aside.is_none()
            && !large.no_aside
            && !large.lost
            // Descriptors may come with such a message: they are read on the caller's thread.
            && large.kind != Kind::Handles
            && large.len - large.filled >= crate::aside::ASIDE_MIN
    }

    /// Starts the thread that reads the rest of the payload in progress from `src`, its
    /// lane. If it cannot start, the payload is read by the polls, as without this. Does
    /// nothing unless [`Receiver::wants_aside`].
    ///
    /// # Safety
    /// `src` must stay open until the thread is finished: until a poll has collected it, or
    /// [`Receiver::halt_aside`] was called, or the receiver is dropped.
    pub unsafe fn start_aside(&mut self, src: BorrowedFd<'_>) {
        if !self.wants_aside() {
            return;
        }
        let large = self.large.as_mut().expect("wants_aside checked it");
        let buf = large.payload.as_mut_slice().as_mut_ptr();
        // SAFETY: the payload's bytes stay where they are (`PayloadBuf`) and allocated until
        // the `AsideRead` is dropped (it is declared before `payload`); from here on nothing
        // touches them from `filled` on while it exists: every method that reads or writes
        // the payload collects or halts it first. `src` is the caller's promise.
        // The thread gets its own copy of the huge-page state (it comes back in `Finished`):
        // if it cannot start, the polls go on following this one.
        let started =
            unsafe { AsideRead::start(src, buf, large.len, large.filled, large.pages.clone()) };
        match started {
            Ok(aside) => large.aside = Some(aside),
            Err(_) => large.no_aside = true,
        }
    }

    /// The descriptor that becomes readable when the thread reading aside is done, while
    /// one runs.
    pub fn aside_fd(&self) -> Option<BorrowedFd<'_>> {
        self.large.as_ref()?.aside.as_ref().map(AsideRead::event_fd)
    }

    /// Stops a thread reading aside, if one runs, and keeps what it read: the next poll
    /// takes it over and goes on from there (by a new thread, or on the caller's). Its
    /// descriptor stays open, and readable, until then: a greenlet waiting on it wakes.
    /// For a caller that stops waiting (a timeout, a killed greenlet) and before a fork:
    /// no thread reads while nobody waits.
    pub fn halt_aside(&mut self) {
        if let Some(aside) = self.large.as_mut().and_then(|large| large.aside.as_mut()) {
            aside.stop();
        }
    }

    /// Halts a thread reading aside, if one runs, and takes over what it left now (its
    /// descriptor is closed): for a reader being closed, or handed over.
    pub fn collect_aside(&mut self) -> Result<(), RecvError> {
        let Some(large) = self.large.as_mut() else {
            return Ok(());
        };
        match large.aside.take() {
            Some(mut aside) => {
                aside.stop();
                Self::absorb(large, aside.finish())
            }
            None => Ok(()),
        }
    }

    /// Takes over what a finished thread left.
    fn absorb(large: &mut LargeFrame<B>, finished: Finished) -> Result<(), RecvError> {
        large.filled = finished.filled;
        if finished.pages.is_some() {
            large.pages = finished.pages;
        }
        match finished.end {
            End::Complete | End::Halted => Ok(()),
            End::Eof => {
                large.no_aside = true;
                Err(RecvError::Torn {
                    received: large.filled as u64,
                    expected: Some(large.len as u64),
                })
            }
            End::Failed(err) => {
                large.no_aside = true;
                Err(RecvError::Io(err))
            }
            End::Lost => {
                large.lost = true;
                Err(RecvError::LostAtFork)
            }
        }
    }

    pub fn max_len(&self) -> u64 {
        self.max_len
    }

    pub fn set_max_len(&mut self, max_len: u64) {
        self.max_len = max_len;
    }

    /// Bytes received but not yet handed out (a partial frame, or whole frames not yet
    /// polled): a large payload in progress counts with its header, so this is above zero
    /// as soon as a message has begun to arrive.
    pub fn buffered(&self) -> usize {
        self.end - self.start
            + self.large.as_ref().map_or(0, |large| {
                HEADER_LEN + large.aside.as_ref().map_or(large.filled, AsideRead::filled)
            })
    }

    /// A receiver that starts from `unread`, the bytes another receiver had received and not
    /// handed out ([`Receiver::unread`]): their messages come first, then the lanes' bytes.
    /// The read buffer grows to hold them if they are more than it holds.
    pub fn resume(max_len: u64, budget: Budget, unread: &[u8]) -> Self {
        let mut rx = Receiver::new(max_len, budget);
        if unread.len() > rx.buf.len() {
            rx.buf = vec![0; unread.len()].into_boxed_slice();
        }
        rx.buf[..unread.len()].copy_from_slice(unread);
        rx.end = unread.len();
        rx
    }

    /// The bytes received and not yet handed out, as the frame lane's stream from the next
    /// unread header on: what [`Receiver::resume`] takes to go on elsewhere, with the same
    /// descriptors, without losing a message. A header already consumed is written again.
    /// Nothing changes here. Fails while a payload is partly read from the bulk lane (its
    /// first bytes are no longer on that lane) or after a corrupt header.
    pub fn unread(&mut self) -> Result<Vec<u8>, &'static str> {
        if self.collect_aside().is_err() {
            return Err("a large message could not be received whole");
        }
        if self.corrupt.is_some() {
            return Err("the stream is corrupt");
        }
        let mut out = Vec::new();
        if let Some(large) = &mut self.large {
            if large.lane == Lane::Bulk && large.filled > 0 {
                return Err("a large message is partly received on the bulk lane");
            }
            let header = encode_lane_header(large.kind, large.len as u64, large.lane)
                .expect("the length came from a valid header");
            out.reserve(HEADER_LEN + large.filled + (self.end - self.start));
            out.extend_from_slice(&header);
            out.extend_from_slice(&large.payload.as_mut_slice()[..large.filled]);
        }
        out.extend_from_slice(&self.buf[self.start..self.end]);
        Ok(out)
    }

    /// Produces the next message, or says why there is none yet. `src` is the frame lane;
    /// `bulk` the bulk lane, on a channel that has one (large payloads may come on it).
    /// `alloc` makes the buffer of a large payload; it is called only after the header
    /// passed every check. After `WouldBlock`, [`Receiver::waiting_lane`] says which
    /// descriptor to wait for.
    pub fn poll_lanes<S, T, A>(
        &mut self,
        src: &mut S,
        mut bulk: Option<&mut T>,
        mut alloc: A,
    ) -> Result<Event<'_, B>, RecvError>
    where
        S: ReadSource,
        T: ReadSource,
        A: FnMut(usize) -> Option<B>,
    {
        self.budget.begin_call();
        let step = self.next_step(src, &mut bulk, &mut alloc);
        self.budget.end_call();
        Ok(match step? {
            Step::Buffered(kind, range) => Event::Message {
                kind,
                payload: Payload::Buffered(&self.buf[range]),
            },
            Step::Owned(kind, payload) => Event::Message {
                kind,
                payload: Payload::Owned(payload),
            },
            Step::WouldBlock => Event::WouldBlock,
            Step::Yield => Event::Yield,
            Step::Again => unreachable!("next_step never returns Again"),
        })
    }

    /// The caller is about to wait on the hub after `WouldBlock` (not to look again on
    /// the CPU): that wait is the event loop's turn, and the next call starts a new slice.
    /// A reader that spins and catches the next message never calls this, so the time it
    /// spends keeping up with a stream adds up, and asks for yields, as a busy stream's.
    pub fn will_wait(&mut self) {
        self.budget.reset();
    }

    /// The descriptor to wait for after `WouldBlock`: the bulk lane while a payload is
    /// coming on it, else the frame lane.
    pub fn waiting_lane(&self) -> Lane {
        self.large.as_ref().map_or(Lane::Frame, |large| large.lane)
    }

    /// Steps until there is something to report.
    fn next_step<S, T, A>(
        &mut self,
        src: &mut S,
        bulk: &mut Option<&mut T>,
        alloc: &mut A,
    ) -> Result<Step<B>, RecvError>
    where
        S: ReadSource,
        T: ReadSource,
        A: FnMut(usize) -> Option<B>,
    {
        loop {
            match self.step(src, bulk, alloc)? {
                Step::Again => continue,
                other => return Ok(other),
            }
        }
    }

    fn step<S, T, A>(
        &mut self,
        src: &mut S,
        bulk: &mut Option<&mut T>,
        alloc: &mut A,
    ) -> Result<Step<B>, RecvError>
    where
        S: ReadSource,
        T: ReadSource,
        A: FnMut(usize) -> Option<B>,
    {
        if let Some(err) = &self.corrupt {
            return Err(RecvError::Frame(err.clone()));
        }
        if let Some(large) = &self.large {
            return match large.lane {
                Lane::Frame => self.step_large(src),
                Lane::Bulk => match bulk {
                    Some(bulk) => self.step_large(*bulk),
                    None => Err(RecvError::Io(io::Error::other(
                        "a payload is due on the bulk lane, but none was given",
                    ))),
                },
            };
        }
        let avail = self.end - self.start;
        let mut needed = HEADER_LEN;
        let mut announced = None;
        if avail >= HEADER_LEN {
            let raw: [u8; HEADER_LEN] = self.buf[self.start..self.start + HEADER_LEN]
                .try_into()
                .expect("slice has header length");
            let (kind, len, lane) =
                decode_header(raw, self.max_len, bulk.is_some()).map_err(|err| {
                    self.corrupt = Some(err.clone());
                    RecvError::Frame(err)
                })?;
            announced = Some(len);
            let len = usize::try_from(len).map_err(|_| RecvError::Alloc { len })?;
            if lane == Lane::Bulk {
                // The payload comes on the other descriptor; nothing of it is buffered here.
                let mut payload = alloc(len).ok_or(RecvError::Alloc { len: len as u64 })?;
                let pages = HugePages::advise(payload.as_mut_slice());
                self.start += HEADER_LEN;
                self.short_read = false; // a large payload is no sign of small messages
                self.large = Some(LargeFrame {
                    aside: None,
                    no_aside: false,
                    lost: false,
                    kind,
                    payload,
                    len,
                    filled: 0,
                    lane,
                    pages,
                });
                return Ok(Step::Again);
            }
            if len > SMALL_PAYLOAD {
                let mut payload = alloc(len).ok_or(RecvError::Alloc { len: len as u64 })?;
                let pages = HugePages::advise(payload.as_mut_slice());
                let from = self.start + HEADER_LEN;
                let have = (avail - HEADER_LEN).min(len);
                payload.as_mut_slice()[..have].copy_from_slice(&self.buf[from..from + have]);
                self.start = from + have;
                self.short_read = false; // a large payload is no sign of small messages
                self.large = Some(LargeFrame {
                    aside: None,
                    no_aside: false,
                    lost: false,
                    kind,
                    payload,
                    len,
                    filled: have,
                    lane,
                    pages,
                });
                return Ok(Step::Again);
            }
            if avail >= HEADER_LEN + len {
                if self.budget.spend(BUFFERED_WEIGHT) {
                    return Ok(Step::Yield);
                }
                let from = self.start + HEADER_LEN;
                self.start = from + len;
                return Ok(Step::Buffered(kind, from..from + len));
            }
            needed = HEADER_LEN + len;
        }
        self.make_room(needed);
        if self.budget.spend(SYSCALL_WEIGHT) {
            return Ok(Step::Yield);
        }
        match src.read_some(&mut self.buf[self.end..]) {
            Ok(0) if avail == 0 => Err(RecvError::Eof),
            Ok(0) => Err(match announced {
                None => RecvError::Torn {
                    received: avail as u64,
                    expected: None,
                },
                Some(len) => RecvError::Torn {
                    received: (avail - HEADER_LEN) as u64,
                    expected: Some(len),
                },
            }),
            Ok(n) => {
                self.end += n;
                self.short_read = n < SHORT_READ;
                Ok(Step::Again)
            }
            Err(err) => self.would_block_or(err),
        }
    }

    fn step_large<S: ReadSource + ?Sized>(&mut self, src: &mut S) -> Result<Step<B>, RecvError> {
        let enabled = self.aside;
        let large = self.large.as_mut().expect("checked by caller");
        if large.lost {
            return Err(RecvError::LostAtFork);
        }
        if let Some(aside) = &large.aside {
            if !aside.is_done() {
                return Ok(Step::WouldBlock);
            }
            let finished = large.aside.take().expect("checked above").finish();
            Self::absorb(large, finished)?;
        }
        if large.filled < large.len && Self::aside_wanted(enabled, large) {
            // The caller that waits next starts the thread (`start_aside`).
            return Ok(Step::WouldBlock);
        }
        if large.filled == large.len {
            let done = self.large.take().expect("checked above");
            if let Some(pages) = done.pages {
                pages.finish();
            }
            return Ok(Step::Owned(done.kind, done.payload));
        }
        if self.budget.spend(SYSCALL_WEIGHT) {
            return Ok(Step::Yield);
        }
        let (filled, len) = (large.filled, large.len);
        let until = len.min(filled + MAX_IO_CHUNK);
        // Timed only while a huge-page hint is being followed: one look at the clock per
        // read of up to 256 KiB.
        let started = large
            .pages
            .as_ref()
            .filter(|pages| pages.advised())
            .map(|_| Instant::now());
        match src.read_some(&mut large.payload.as_mut_slice()[filled..until]) {
            Ok(0) => Err(RecvError::Torn {
                received: filled as u64,
                expected: Some(len as u64),
            }),
            Ok(n) => {
                if let (Some(pages), Some(started)) = (&mut large.pages, started) {
                    pages.after_read(large.payload.as_mut_slice(), filled, n, started.elapsed());
                }
                large.filled += n;
                Ok(Step::Again)
            }
            Err(err) => self.would_block_or(err),
        }
    }

    fn would_block_or(&mut self, err: io::Error) -> Result<Step<B>, RecvError> {
        if err.kind() == io::ErrorKind::WouldBlock {
            // Not a new slice yet: the caller may look again at once (a spin) rather than
            // wait on the hub, and the slice goes on until it does (`Receiver::will_wait`).
            Ok(Step::WouldBlock)
        } else {
            Err(RecvError::Io(err))
        }
    }

    /// Makes sure the frame in progress (`needed` bytes from `start`) fits, and that the next
    /// read has a useful amount of space, by moving the unread bytes to the front.
    fn make_room(&mut self, needed: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            return;
        }
        let cap = self.buf.len();
        if self.start + needed > cap || cap - self.end < cap / 4 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::ScriptedSource;
    use proptest::prelude::*;

    fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut out = encode_lane_header(kind, payload.len() as u64, Lane::Frame)
            .unwrap()
            .to_vec();
        out.extend_from_slice(payload);
        out
    }

    /// The bulk lane of a channel that has none.
    const NO_BULK: Option<&mut ScriptedSource> = None;

    fn receiver() -> Receiver<Vec<u8>> {
        Receiver::new(u64::MAX, Budget::new(None))
    }

    fn alloc(len: usize) -> Option<Vec<u8>> {
        Some(vec![0; len])
    }

    type Messages = Vec<(Kind, Vec<u8>)>;

    fn payload_vec(payload: Payload<'_, Vec<u8>>) -> Vec<u8> {
        match payload {
            Payload::Buffered(b) => b.to_vec(),
            Payload::Owned(v) => v,
        }
    }

    /// Polls until the source runs dry, collecting messages, and returns how it ended.
    fn drain(
        rx: &mut Receiver<Vec<u8>>,
        src: &mut ScriptedSource,
    ) -> (Messages, Result<(), RecvError>) {
        let mut got = Vec::new();
        loop {
            match rx.poll_lanes(src, NO_BULK, alloc) {
                Ok(Event::Message { kind, payload }) => got.push((kind, payload_vec(payload))),
                Ok(Event::WouldBlock) if src.is_exhausted() => return (got, Ok(())),
                Ok(Event::WouldBlock) | Ok(Event::Yield) => continue,
                Err(err) => return (got, Err(err)),
            }
        }
    }

    #[test]
    fn many_small_frames_come_from_one_read() {
        let mut stream = Vec::new();
        for i in 0..500u32 {
            stream.extend(frame(Kind::Encoded, &i.to_le_bytes()));
        }
        let mut src = ScriptedSource::whole(stream);
        let mut rx = receiver();
        let (got, end) = drain(&mut rx, &mut src);
        assert!(end.is_ok());
        assert_eq!(got.len(), 500);
        assert_eq!(got[499].1, 499u32.to_le_bytes());
        assert_eq!(
            src.reads(),
            2,
            "one read for all frames, one that would block"
        );
    }

    #[test]
    fn caught_up_after_a_short_read_is_all_handed_out() {
        let small = frame(Kind::Encoded, &[7u8; 60]);
        let mut rx = receiver();
        assert!(!rx.caught_up(), "nothing read yet");
        // Three messages and half of a fourth in one short read.
        let mut stream = small.repeat(3);
        stream.extend_from_slice(&small[..30]);
        let mut src = ScriptedSource::split(&stream, &[stream.len()]);
        for _ in 0..3 {
            assert!(matches!(
                rx.poll_lanes(&mut src, NO_BULK, alloc),
                Ok(Event::Message { .. })
            ));
            assert!(!rx.caught_up(), "messages or part of one still here");
        }
        assert!(matches!(
            rx.poll_lanes(&mut src, NO_BULK, alloc),
            Ok(Event::WouldBlock)
        ));
        assert!(!rx.caught_up(), "half a message waits for its rest");
        let mut src = ScriptedSource::whole(small[30..].to_vec());
        let (got, _) = drain(&mut rx, &mut src);
        assert_eq!(got.len(), 1);
        assert!(rx.caught_up());

        // A long read of small messages, all handed out, is no sign of keeping up...
        let (got, _) = drain(&mut rx, &mut ScriptedSource::whole(small.repeat(100)));
        assert_eq!(got.len(), 100);
        assert!(!rx.caught_up());
        // ...nor is a large payload, even one that ends with a short read.
        let large = frame(Kind::Bytes, &vec![1u8; SMALL_PAYLOAD + 1]);
        let mut src = ScriptedSource::chunks(&large, 1000);
        let (got, _) = drain(&mut rx, &mut src);
        assert_eq!(got.len(), 1);
        assert!(!rx.caught_up());

        // The same for a payload on the bulk lane, whose header came in a short read.
        let (got, _) = drain(&mut rx, &mut ScriptedSource::whole(small.clone()));
        assert_eq!(got.len(), 1);
        assert!(rx.caught_up());
        let header = encode_lane_header(Kind::Bytes, 6, Lane::Bulk).unwrap();
        let mut src = ScriptedSource::whole(header.to_vec());
        let mut bulk = ScriptedSource::whole(b"abcdef".to_vec());
        let got = loop {
            match rx.poll_lanes(&mut src, Some(&mut bulk), alloc).unwrap() {
                Event::Message { payload, .. } => break payload_vec(payload),
                Event::WouldBlock => panic!("the payload is all there"),
                _ => {}
            }
        };
        assert_eq!(got, b"abcdef");
        assert!(!rx.caught_up());
    }

    #[test]
    fn every_split_point_yields_the_same_messages() {
        let mut stream = frame(Kind::Bytes, b"first");
        stream.extend(frame(Kind::Encoded, b""));
        stream.extend(frame(Kind::Batch, &[7u8; 40_000]));
        stream.extend(frame(Kind::Encoded, b"last"));
        for cut in 0..stream.len() {
            let mut src = ScriptedSource::split(&stream, &[cut]);
            let (got, end) = drain(&mut receiver(), &mut src);
            assert!(end.is_ok(), "cut at {cut}: {end:?}");
            let kinds: Vec<Kind> = got.iter().map(|m| m.0).collect();
            assert_eq!(
                kinds,
                [Kind::Bytes, Kind::Encoded, Kind::Batch, Kind::Encoded]
            );
            assert_eq!(got[2].1, vec![7u8; 40_000]);
            assert_eq!(got[3].1, b"last");
        }
    }

    #[test]
    fn large_payload_is_read_into_its_own_buffer() {
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let stream = frame(Kind::Bytes, &payload);
        let mut src = ScriptedSource::chunks(&stream, 65_536);
        let mut rx = receiver();
        let mut allocations = Vec::new();
        let received = loop {
            match rx.poll_lanes(&mut src, NO_BULK, |len| {
                allocations.push(len);
                Some(vec![0; len])
            }) {
                Ok(Event::Message {
                    payload: Payload::Owned(v),
                    ..
                }) => break v,
                Ok(Event::WouldBlock) | Ok(Event::Yield) => continue,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(allocations, [payload.len()]);
        assert!(received == payload);
    }

    #[test]
    fn a_finished_large_payload_leaves_its_huge_pages_for_the_next() {
        let len = crate::memory::HUGE_PAGE_HINT_MIN + 12_345;
        let stream = frame(Kind::Bytes, &vec![3u8; len]);
        let mut src = ScriptedSource::chunks(&stream, MAX_IO_CHUNK);
        let started = crate::budget::now_ns();
        let (got, end) = drain(&mut receiver(), &mut src);
        assert!(end.is_ok());
        assert_eq!(got.len(), 1);
        if crate::memory::HugePages::advise(&mut vec![0u8; len]).is_some() {
            // Transparent huge pages are available: the record is there, and recent.
            let (at, _) = crate::memory::last_buffer().expect("finished buffers are recorded");
            assert!(at >= started);
        }
    }

    #[test]
    fn eof_between_frames_is_clean_and_repeats() {
        let mut src = ScriptedSource::whole(frame(Kind::Encoded, b"x")).then_eof();
        let mut rx = receiver();
        let (got, end) = drain(&mut rx, &mut src);
        assert_eq!(got.len(), 1);
        assert!(matches!(end, Err(RecvError::Eof)));
        assert!(matches!(
            rx.poll_lanes(&mut src, NO_BULK, alloc),
            Err(RecvError::Eof)
        ));
    }

    #[test]
    fn eof_inside_the_header_is_torn() {
        let mut src = ScriptedSource::whole(frame(Kind::Encoded, b"abc")[..5].to_vec()).then_eof();
        let (_, end) = drain(&mut receiver(), &mut src);
        match end {
            Err(RecvError::Torn {
                received: 5,
                expected: None,
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn eof_inside_a_small_payload_is_torn() {
        let mut src =
            ScriptedSource::whole(frame(Kind::Encoded, b"abcdef")[..10].to_vec()).then_eof();
        let (_, end) = drain(&mut receiver(), &mut src);
        let err = end.unwrap_err();
        assert!(matches!(
            err,
            RecvError::Torn {
                received: 2,
                expected: Some(6)
            }
        ));
        assert!(err.to_string().contains("2 of 6 payload bytes"));
    }

    #[test]
    fn eof_inside_a_large_payload_is_torn() {
        let full = frame(Kind::Bytes, &vec![1u8; 100_000]);
        let mut src = ScriptedSource::chunks(&full[..50_008], 4096).then_eof();
        let (_, end) = drain(&mut receiver(), &mut src);
        assert!(matches!(
            end,
            Err(RecvError::Torn {
                received: 50_000,
                expected: Some(100_000)
            })
        ));
    }

    #[test]
    fn a_bulk_payload_is_read_from_the_bulk_lane_then_frames_go_on() {
        let mut frames = encode_lane_header(Kind::Bytes, 6, Lane::Bulk)
            .unwrap()
            .to_vec();
        frames.extend(frame(Kind::Encoded, b"next"));
        let mut src = ScriptedSource::whole(frames);
        let mut bulk = ScriptedSource::split(b"abcdef", &[2]);
        let mut rx = receiver();
        let mut polls = 0;
        let first = loop {
            polls += 1;
            match rx.poll_lanes(&mut src, Some(&mut bulk), alloc).unwrap() {
                Event::Message { kind, payload } => break (kind, payload_vec(payload)),
                _ => assert!(polls < 10),
            }
        };
        assert_eq!(first, (Kind::Bytes, b"abcdef".to_vec()));
        assert_eq!(rx.waiting_lane(), Lane::Frame);
        match rx.poll_lanes(&mut src, Some(&mut bulk), alloc).unwrap() {
            Event::Message { kind, payload } => {
                assert_eq!(
                    (kind, payload_vec(payload)),
                    (Kind::Encoded, b"next".to_vec())
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn waiting_for_a_bulk_payload_names_the_bulk_lane() {
        let header = encode_lane_header(Kind::Bytes, 10, Lane::Bulk)
            .unwrap()
            .to_vec();
        let mut src = ScriptedSource::whole(header);
        let mut bulk = ScriptedSource::whole(b"12345".to_vec());
        let mut rx = receiver();
        assert!(matches!(
            rx.poll_lanes(&mut src, Some(&mut bulk), alloc).unwrap(),
            Event::WouldBlock
        ));
        assert_eq!(rx.waiting_lane(), Lane::Bulk);
        assert_eq!(
            rx.buffered(),
            HEADER_LEN + 5,
            "the header counts: the message has begun"
        );
    }

    #[test]
    fn a_bulk_lane_that_ends_mid_payload_is_a_torn_message() {
        let header = encode_lane_header(Kind::Bytes, 10, Lane::Bulk)
            .unwrap()
            .to_vec();
        let mut src = ScriptedSource::whole(header);
        let mut bulk = ScriptedSource::whole(b"1234".to_vec()).then_eof();
        let err = receiver()
            .poll_lanes(&mut src, Some(&mut bulk), alloc)
            .unwrap_err();
        assert!(matches!(
            err,
            RecvError::Torn {
                received: 4,
                expected: Some(10)
            }
        ));
    }

    #[test]
    fn a_bulk_header_on_a_channel_without_a_bulk_lane_is_corrupt() {
        let header = encode_lane_header(Kind::Bytes, 10, Lane::Bulk)
            .unwrap()
            .to_vec();
        let mut src = ScriptedSource::whole(header);
        let err = receiver()
            .poll_lanes(&mut src, NO_BULK, |_| panic!("must not allocate"))
            .unwrap_err();
        assert!(matches!(
            err,
            RecvError::Frame(FrameError::UnknownKind { .. })
        ));
    }

    #[test]
    fn corrupt_header_is_refused_for_good_and_allocates_nothing() {
        let mut src = ScriptedSource::whole(vec![0xAB; 64]);
        let mut rx = receiver();
        let mut asked = 0;
        for _ in 0..3 {
            let err = rx
                .poll_lanes(&mut src, NO_BULK, |len| {
                    asked += 1;
                    alloc(len)
                })
                .unwrap_err();
            assert!(matches!(err, RecvError::Frame(FrameError::BadMagic { .. })));
        }
        assert_eq!(asked, 0);
    }

    #[test]
    fn announced_length_above_the_maximum_allocates_nothing() {
        let header = encode_lane_header(Kind::Encoded, 1 << 39, Lane::Frame).unwrap();
        let mut src = ScriptedSource::whole(header.to_vec());
        let mut rx: Receiver<Vec<u8>> = Receiver::new(1 << 20, Budget::new(None));
        let err = rx
            .poll_lanes(&mut src, NO_BULK, |_| panic!("must not allocate"))
            .unwrap_err();
        assert!(matches!(
            err,
            RecvError::Frame(FrameError::TooLarge {
                len: 549_755_813_888,
                max: 1_048_576
            })
        ));
    }

    #[test]
    fn failed_allocation_is_an_error_not_a_crash() {
        let mut src = ScriptedSource::whole(frame(Kind::Bytes, &vec![0u8; 50_000]));
        let err = receiver()
            .poll_lanes(&mut src, NO_BULK, |_| None)
            .unwrap_err();
        assert!(matches!(err, RecvError::Alloc { len: 50_000 }));
    }

    #[test]
    fn io_errors_pass_through() {
        let mut src = ScriptedSource::failing(io::ErrorKind::PermissionDenied);
        let err = receiver().poll_lanes(&mut src, NO_BULK, alloc).unwrap_err();
        assert!(matches!(err, RecvError::Io(e) if e.kind() == io::ErrorKind::PermissionDenied));
    }

    #[test]
    fn no_read_asks_for_more_than_one_chunk() {
        let big: Vec<u8> = (0..3 * MAX_IO_CHUNK + 5).map(|i| i as u8).collect();
        let mut src = ScriptedSource::whole(frame(Kind::Bytes, &big));
        let (got, end) = drain(&mut receiver(), &mut src);
        assert!(end.is_ok());
        assert_eq!(got, vec![(Kind::Bytes, big)]);
        assert!(src.largest_read <= MAX_IO_CHUNK, "{}", src.largest_read);
    }

    #[test]
    fn a_busy_stream_asks_for_yields_without_losing_messages() {
        let mut stream = Vec::new();
        for i in 0..20_000u32 {
            stream.extend(frame(Kind::Encoded, &i.to_le_bytes()));
        }
        let mut src = ScriptedSource::chunks(&stream, 4096);
        // A tiny slice, but longer than the gap between two polls: a pause longer than the
        // slice would rightly start a fresh one.
        let slice = std::time::Duration::from_micros(5);
        let mut rx = Receiver::new(u64::MAX, Budget::new(Some(slice)));
        let (mut yields, mut next) = (0, 0u32);
        loop {
            match rx.poll_lanes(&mut src, NO_BULK, alloc).unwrap() {
                Event::Message {
                    payload: Payload::Buffered(b),
                    ..
                } => {
                    assert_eq!(b, next.to_le_bytes());
                    next += 1;
                }
                Event::Yield => yields += 1,
                Event::WouldBlock => break,
                Event::Message { .. } => unreachable!(),
            }
        }
        assert_eq!(next, 20_000);
        assert!(yields > 100, "only {yields} yields");
    }

    #[test]
    fn a_reader_that_looks_again_instead_of_waiting_still_asks_for_yields() {
        // A reader that keeps up with its writer by spinning sees "would block" between
        // two messages and looks again on the CPU: the event loop has had no turn, so the
        // slice goes on. (It used to start over at every "would block": a stream read that
        // way never yielded, and stalled the loop for its whole length.)
        let frames: Vec<Vec<u8>> = (0..20_000u32)
            .map(|i| frame(Kind::Encoded, &i.to_le_bytes()))
            .collect();
        let mut src = ScriptedSource::paced(&frames);
        let slice = std::time::Duration::from_micros(5);
        let mut rx = Receiver::new(u64::MAX, Budget::new(Some(slice)));
        let (mut yields, mut next) = (0, 0u32);
        while !src.is_exhausted() {
            match rx.poll_lanes(&mut src, NO_BULK, alloc).unwrap() {
                Event::Message { .. } => next += 1,
                Event::Yield => yields += 1,
                Event::WouldBlock => {} // look again at once, as a spin does
            }
        }
        assert_eq!(next, 20_000);
        assert!(yields > 100, "only {yields} yields");
    }

    #[test]
    fn a_bulk_payload_not_yet_started_can_be_handed_over_a_started_one_cannot() {
        let mut frames = encode_lane_header(Kind::Bytes, 6, Lane::Bulk)
            .unwrap()
            .to_vec();
        frames.extend(frame(Kind::Encoded, b"next"));
        let mut src = ScriptedSource::whole(frames);
        let mut idle = ScriptedSource::split(b"", &[]);
        let mut rx = receiver();
        // The header is read; its payload has not come yet.
        assert!(matches!(
            rx.poll_lanes(&mut src, Some(&mut idle), alloc),
            Ok(Event::WouldBlock)
        ));
        assert_eq!(rx.waiting_lane(), Lane::Bulk);
        let unread = rx.unread().unwrap();
        let mut moved: Receiver<Vec<u8>> = Receiver::resume(u64::MAX, Budget::new(None), &unread);
        let mut empty = ScriptedSource::split(b"", &[]);
        let mut bulk = ScriptedSource::whole(b"abcdef".to_vec());
        let mut got = Vec::new();
        for _ in 0..10 {
            if let Event::Message { kind, payload } = moved
                .poll_lanes(&mut empty, Some(&mut bulk), alloc)
                .unwrap()
            {
                got.push((kind, payload_vec(payload)));
            }
        }
        assert_eq!(
            got,
            [
                (Kind::Bytes, b"abcdef".to_vec()),
                (Kind::Encoded, b"next".to_vec())
            ]
        );

        // Part of a payload taken from the bulk lane cannot be put back there.
        let mut src = ScriptedSource::whole(
            encode_lane_header(Kind::Bytes, 6, Lane::Bulk)
                .unwrap()
                .to_vec(),
        );
        let mut bulk = ScriptedSource::whole(b"abc".to_vec());
        let mut rx = receiver();
        for _ in 0..3 {
            let _ = rx.poll_lanes(&mut src, Some(&mut bulk), alloc).unwrap();
        }
        assert!(rx.unread().unwrap_err().contains("bulk lane"));
    }

    /// Reading aside, on a real socket pair (the thread reads a descriptor).
    #[cfg(target_os = "linux")]
    mod aside {
        use super::*;
        use crate::aside::ASIDE_MIN;
        use crate::io::FdReader;
        use std::io::Write;
        use std::os::fd::AsFd;
        use std::os::unix::net::UnixStream;
        use std::time::{Duration, Instant};

        type NoBulk<'a> = Option<&'a mut FdReader<'a>>;

        fn aside_receiver() -> Receiver<Vec<u8>> {
            let mut rx = receiver();
            rx.set_read_aside(true);
            rx
        }

        fn pair() -> (UnixStream, UnixStream) {
            let (tx, rx) = UnixStream::pair().unwrap();
            rx.set_nonblocking(true).unwrap();
            (tx, rx)
        }

        /// Polls as gipc's reader does: starts the thread when asked to, and waits for its
        /// descriptor (or the lane's) instead of spinning.
        fn next(
            rx: &mut Receiver<Vec<u8>>,
            lane: &UnixStream,
        ) -> Result<(Kind, Vec<u8>), RecvError> {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                assert!(Instant::now() < deadline, "no message in 30 s");
                let mut src = FdReader(lane.as_fd());
                match rx.poll_lanes(&mut src, None as NoBulk, alloc)? {
                    Event::Message { kind, payload } => return Ok((kind, payload_vec(payload))),
                    Event::Yield => continue,
                    Event::WouldBlock => {
                        if rx.wants_aside() {
                            // SAFETY: `lane` outlives the receiver's use of it in this test.
                            unsafe { rx.start_aside(lane.as_fd()) };
                        }
                        let fd = rx.aside_fd().unwrap_or(lane.as_fd());
                        let mut fds = [rustix::event::PollFd::new(
                            &fd,
                            rustix::event::PollFlags::IN,
                        )];
                        rustix::event::poll(&mut fds, None).unwrap();
                    }
                }
            }
        }

        /// Writes `bytes` on a thread of its own (more than a socket buffer holds blocks
        /// until the receiver reads), and gives the stream back when done.
        fn write_aside(mut tx: UnixStream, bytes: Vec<u8>) -> std::thread::JoinHandle<UnixStream> {
            std::thread::spawn(move || {
                tx.write_all(&bytes).unwrap();
                tx
            })
        }

        /// Polls until a large payload has begun and the receiver asks for a thread.
        fn until_it_wants_aside(rx: &mut Receiver<Vec<u8>>, src: &mut FdReader<'_>) {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !rx.wants_aside() {
                assert!(Instant::now() < deadline, "no large payload began");
                assert!(matches!(
                    rx.poll_lanes(src, None as NoBulk, alloc),
                    Ok(Event::WouldBlock)
                ));
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        fn payload(len: usize) -> Vec<u8> {
            (0..len).map(|i| (i % 251) as u8).collect()
        }

        #[test]
        fn a_large_payload_is_read_aside_and_the_next_frames_on_the_loop() {
            let (mut tx, lane) = pair();
            let big = payload(ASIDE_MIN + 12_345);
            let mut stream = frame(Kind::Bytes, &big);
            stream.extend(frame(Kind::Encoded, b"after"));
            let writer = std::thread::spawn(move || tx.write_all(&stream).map(|_| tx));
            let mut rx = aside_receiver();
            let (kind, got) = next(&mut rx, &lane).unwrap();
            assert_eq!(kind, Kind::Bytes);
            assert!(got == big, "payload differs");
            assert!(
                rx.aside_fd().is_none(),
                "the thread is collected with its message"
            );
            assert_eq!(
                next(&mut rx, &lane).unwrap(),
                (Kind::Encoded, b"after".to_vec())
            );
            let _tx = writer.join().unwrap().unwrap();
        }

        #[test]
        fn small_payloads_and_a_receiver_without_aside_never_start_a_thread() {
            let (mut tx, lane) = pair();
            let mid = payload(ASIDE_MIN - 1);
            tx.write_all(&frame(Kind::Bytes, &mid)[..HEADER_LEN + 10])
                .unwrap();
            let mut rx = aside_receiver();
            let mut src = FdReader(lane.as_fd());
            assert!(matches!(
                rx.poll_lanes(&mut src, None as NoBulk, alloc),
                Ok(Event::WouldBlock)
            ));
            assert!(!rx.wants_aside(), "below ASIDE_MIN");
            let big = payload(ASIDE_MIN);
            let mut plain = receiver();
            let (mut tx2, lane2) = pair();
            tx2.write_all(&frame(Kind::Bytes, &big)[..HEADER_LEN + 10])
                .unwrap();
            let mut src2 = FdReader(lane2.as_fd());
            assert!(matches!(
                plain.poll_lanes(&mut src2, None as NoBulk, alloc),
                Ok(Event::WouldBlock)
            ));
            assert!(!plain.wants_aside(), "not enabled");
            assert_eq!(plain.buffered(), HEADER_LEN + 10);
        }

        #[test]
        fn a_halted_thread_leaves_its_bytes_and_the_payload_goes_on() {
            let (tx, lane) = pair();
            let big = payload(ASIDE_MIN + (1 << 20));
            let stream = frame(Kind::Bytes, &big);
            let half = stream.len() / 2;
            let writer = write_aside(tx, stream[..half].to_vec());
            let mut rx = aside_receiver();
            let mut src = FdReader(lane.as_fd());
            until_it_wants_aside(&mut rx, &mut src);
            // SAFETY: `lane` outlives the receiver's use of it.
            unsafe { rx.start_aside(lane.as_fd()) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while rx.buffered() < half {
                assert!(
                    Instant::now() < deadline,
                    "the thread read {} of {half}",
                    rx.buffered()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            rx.halt_aside();
            // Stopped, and left for the next poll to take over: its descriptor stays open
            // and readable, so that whoever waits on it wakes.
            let fd = rx.aside_fd().expect("kept until the next poll");
            let mut fds = [rustix::event::PollFd::new(
                &fd,
                rustix::event::PollFlags::IN,
            )];
            assert_eq!(
                rustix::event::poll(&mut fds, Some(&Default::default())).unwrap(),
                1
            );
            assert_eq!(rx.buffered(), half, "what the thread read is kept");
            let tx = writer.join().unwrap();
            let writer = write_aside(tx, stream[half..].to_vec());
            let (_, got) = next(&mut rx, &lane).unwrap();
            assert!(got == big, "payload differs");
            writer.join().unwrap();
        }

        #[test]
        fn a_writer_gone_mid_payload_is_a_torn_message_with_the_count() {
            let (mut tx, lane) = pair();
            let big = payload(ASIDE_MIN + (1 << 20));
            tx.write_all(&frame(Kind::Bytes, &big)[..HEADER_LEN + 5000])
                .unwrap();
            drop(tx);
            let mut rx = aside_receiver();
            match next(&mut rx, &lane) {
                Err(RecvError::Torn { received, expected }) => {
                    assert_eq!((received, expected), (5000, Some(big.len() as u64)));
                }
                other => panic!("{other:?}"),
            }
        }

        #[test]
        fn unread_halts_the_thread_and_hands_over_every_byte() {
            let (tx, lane) = pair();
            let big = payload(ASIDE_MIN + (1 << 20));
            let stream = frame(Kind::Bytes, &big);
            let writer = write_aside(tx, stream[..HEADER_LEN + 300_000].to_vec());
            let mut rx = aside_receiver();
            let mut src = FdReader(lane.as_fd());
            until_it_wants_aside(&mut rx, &mut src);
            // SAFETY: `lane` outlives the receiver's use of it.
            unsafe { rx.start_aside(lane.as_fd()) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while rx.buffered() < HEADER_LEN + 300_000 {
                assert!(Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut tx = writer.join().unwrap();
            let unread = rx.unread().unwrap();
            assert!(rx.aside_fd().is_none(), "halted");
            assert!(
                unread == stream[..HEADER_LEN + 300_000],
                "the frame as it came"
            );
            // A receiver resumed from those bytes, on the same lane, gets the whole message.
            let mut moved = Receiver::resume(u64::MAX, Budget::new(None), &unread);
            moved.set_read_aside(true);
            let rest = stream[HEADER_LEN + 300_000..].to_vec();
            let writer = std::thread::spawn(move || tx.write_all(&rest).map(|_| tx));
            let (_, got) = next(&mut moved, &lane).unwrap();
            let _tx = writer.join().unwrap().unwrap();
            assert!(got == big, "payload differs");
        }

        #[test]
        fn dropping_a_receiver_mid_payload_stops_its_thread() {
            let (mut tx, lane) = pair();
            tx.write_all(&frame(Kind::Bytes, &payload(ASIDE_MIN + (1 << 20)))[..HEADER_LEN + 10])
                .unwrap();
            let mut rx = aside_receiver();
            let mut src = FdReader(lane.as_fd());
            until_it_wants_aside(&mut rx, &mut src);
            // SAFETY: `lane` outlives the receiver.
            unsafe { rx.start_aside(lane.as_fd()) };
            assert!(rx.aside_fd().is_some());
            let t0 = Instant::now();
            drop(rx); // the thread waits in poll for more: woken, stopped, joined
            assert!(t0.elapsed() < Duration::from_secs(5));
        }
    }

    proptest! {
        #[test]
        fn a_receiver_handed_over_at_any_point_loses_no_message(
            payloads in proptest::collection::vec(
                proptest::collection::vec(any::<u8>(), 0..70_000), 1..6),
            chunk in 1usize..100_000,
            polls_before in 0usize..12,
        ) {
            let mut stream = Vec::new();
            for p in &payloads {
                stream.extend(frame(Kind::Encoded, p));
            }
            let mut src = ScriptedSource::chunks(&stream, chunk).then_eof();
            let mut first = receiver();
            let mut got = Vec::new();
            for _ in 0..polls_before {
                match first.poll_lanes(&mut src, NO_BULK, alloc) {
                    Ok(Event::Message { payload, .. }) => got.push(payload_vec(payload)),
                    Ok(_) => {}
                    Err(err) => prop_assert!(matches!(err, RecvError::Eof)),
                }
            }
            let unread = first.unread().unwrap();
            prop_assert_eq!(unread.len() >= first.buffered(), true);
            let mut second: Receiver<Vec<u8>> =
                Receiver::resume(u64::MAX, Budget::new(None), &unread);
            let (rest, end) = drain(&mut second, &mut src);
            prop_assert!(matches!(end, Err(RecvError::Eof)));
            got.extend(rest.into_iter().map(|m| m.1));
            prop_assert_eq!(got, payloads);
        }

        #[test]
        fn frames_survive_any_chunking(
            payloads in proptest::collection::vec(
                proptest::collection::vec(any::<u8>(), 0..70_000), 1..6),
            chunk in 1usize..100_000,
        ) {
            let mut stream = Vec::new();
            for p in &payloads {
                stream.extend(frame(Kind::Encoded, p));
            }
            let mut src = ScriptedSource::chunks(&stream, chunk).then_eof();
            let (got, end) = drain(&mut receiver(), &mut src);
            prop_assert!(matches!(end, Err(RecvError::Eof)));
            let got: Vec<Vec<u8>> = got.into_iter().map(|m| m.1).collect();
            prop_assert_eq!(got, payloads);
        }

        #[test]
        fn arbitrary_bytes_never_panic_or_over_allocate(
            stream in proptest::collection::vec(any::<u8>(), 0..4096),
            magic_prefix in any::<bool>(),
            chunk in 1usize..512,
        ) {
            // Half the cases start with a valid magic so the length checks are reached.
            let mut stream = stream;
            if magic_prefix && stream.len() >= HEADER_LEN {
                stream[6] = 0x70;
                stream[7] = 0x67;
            }
            let max = 1u64 << 16;
            let mut rx: Receiver<Vec<u8>> = Receiver::new(max, Budget::new(None));
            let mut src = ScriptedSource::chunks(&stream, chunk).then_eof();
            for _ in 0..10_000 {
                match rx.poll_lanes(&mut src, NO_BULK, |len| {
                    assert!(len as u64 <= max);
                    Some(vec![0; len])
                }) {
                    Ok(Event::Message { .. }) | Ok(Event::Yield) | Ok(Event::WouldBlock) => {}
                    Err(_) => break,
                }
            }
        }
    }
}
