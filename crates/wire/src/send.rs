//! The sending half of a channel: queues frames and writes them with gathering writes, never
//! waiting and never copying a payload.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use crate::budget::{Budget, SYSCALL_WEIGHT};
use crate::frame::{encode_header, FrameError, Kind, HEADER_LEN};
use crate::io::{WriteSink, MAX_IO_CHUNK};

/// At most this many buffers go into one `writev` (POSIX guarantees 16; Linux and macOS
/// allow 1024).
pub const MAX_IOVECS: usize = 256;

/// How far one call to [`Sender::flush`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Everything queued is written.
    Done,
    /// The descriptor is full: wait until it is writable, then flush again.
    WouldBlock,
    /// The time slice is used up while the descriptor still takes data: give the event loop
    /// a turn, then flush again.
    Yield,
}

struct Pending<P> {
    header: [u8; HEADER_LEN],
    payload: P,
    /// Bytes of header plus payload already written.
    written: usize,
}

impl<P: AsRef<[u8]>> Pending<P> {
    fn total(&self) -> usize {
        HEADER_LEN + self.payload.as_ref().len()
    }
}

pub struct Sender<P> {
    queue: VecDeque<Pending<P>>,
    budget: Budget,
}

impl<P: AsRef<[u8]>> Sender<P> {
    pub fn new(budget: Budget) -> Self {
        Sender {
            queue: VecDeque::new(),
            budget,
        }
    }

    /// Queues one frame. Its bytes go out with the next [`Sender::flush`].
    pub fn push(&mut self, kind: Kind, payload: P) -> Result<(), FrameError> {
        let header = encode_header(kind, payload.as_ref().len() as u64)?;
        self.queue.push_back(Pending {
            header,
            payload,
            written: 0,
        });
        Ok(())
    }

    /// True while queued frames are not entirely written.
    pub fn has_pending(&self) -> bool {
        !self.queue.is_empty()
    }

    /// True when a frame has been partly written: dropping the queue would tear it.
    pub fn is_mid_frame(&self) -> bool {
        self.queue.front().is_some_and(|p| p.written > 0)
    }

    /// Forgets every queued frame.
    pub fn discard(&mut self) {
        self.queue.clear();
    }

    /// Writes as much of the queue as the descriptor takes now.
    pub fn flush<W: WriteSink>(&mut self, sink: &mut W) -> io::Result<Progress> {
        self.budget.begin_call();
        let progress = self.flush_queue(sink);
        self.budget.end_call();
        progress
    }

    fn flush_queue<W: WriteSink>(&mut self, sink: &mut W) -> io::Result<Progress> {
        while !self.queue.is_empty() {
            if self.budget.spend(SYSCALL_WEIGHT) {
                return Ok(Progress::Yield);
            }
            let written = {
                let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
                let mut count = 0;
                let mut room = MAX_IO_CHUNK;
                for frame in self.queue.iter() {
                    if count + 2 > MAX_IOVECS || room == 0 {
                        break;
                    }
                    let payload = frame.payload.as_ref();
                    if frame.written < HEADER_LEN {
                        let header = &frame.header[frame.written..];
                        let body = &payload[..payload.len().min(room.saturating_sub(header.len()))];
                        iov[count] = IoSlice::new(header);
                        iov[count + 1] = IoSlice::new(body);
                        count += 2;
                        room = room.saturating_sub(header.len() + body.len());
                    } else {
                        let rest = &payload[frame.written - HEADER_LEN..];
                        let body = &rest[..rest.len().min(room)];
                        iov[count] = IoSlice::new(body);
                        count += 1;
                        room -= body.len();
                    }
                }
                sink.write_some(&iov[..count])
            };
            match written {
                // Every frame has an 8-byte header, so a zero-length write means no room.
                Ok(0) => return Ok(self.would_block()),
                Ok(n) => self.advance(n),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(self.would_block())
                }
                Err(err) => return Err(err),
            }
        }
        Ok(Progress::Done)
    }

    fn would_block(&mut self) -> Progress {
        // The caller is about to wait on the hub: that is the yield.
        self.budget.reset();
        Progress::WouldBlock
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let front = self.queue.front_mut().expect("wrote more than was queued");
            let left = front.total() - front.written;
            if n < left {
                front.written += n;
                return;
            }
            n -= left;
            self.queue.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Budget;
    use crate::recv::{Event, Payload, Receiver};
    use crate::testing::{ChokedSink, ScriptedSource};
    use proptest::prelude::*;

    fn sender() -> Sender<Vec<u8>> {
        Sender::new(Budget::new(None))
    }

    fn flush_all(tx: &mut Sender<Vec<u8>>, sink: &mut ChokedSink) {
        for _ in 0..1_000_000 {
            match tx.flush(sink).unwrap() {
                Progress::Done => return,
                Progress::WouldBlock | Progress::Yield => continue,
            }
        }
        panic!("flush never finished");
    }

    fn decode_all(bytes: Vec<u8>) -> Vec<(Kind, Vec<u8>)> {
        let mut rx: Receiver<Vec<u8>> = Receiver::new(u64::MAX, Budget::new(None));
        let mut src = ScriptedSource::whole(bytes);
        let mut out = Vec::new();
        while let Event::Message { kind, payload } =
            rx.poll(&mut src, |n| Some(vec![0; n])).unwrap()
        {
            out.push((
                kind,
                match payload {
                    Payload::Buffered(b) => b.to_vec(),
                    Payload::Owned(v) => v,
                },
            ));
        }
        out
    }

    #[test]
    fn partial_writes_resume_where_they_stopped() {
        for per_call in [1, 3, 8, 9, 1000] {
            let mut tx = sender();
            tx.push(Kind::Encoded, b"hello".to_vec()).unwrap();
            tx.push(Kind::Bytes, vec![]).unwrap();
            tx.push(Kind::Batch, vec![9; 5000]).unwrap();
            let mut sink = ChokedSink::new(per_call);
            flush_all(&mut tx, &mut sink);
            assert!(!tx.has_pending());
            let got = decode_all(sink.taken);
            assert_eq!(got.len(), 3, "per_call {per_call}");
            assert_eq!(got[0], (Kind::Encoded, b"hello".to_vec()));
            assert_eq!(got[1], (Kind::Bytes, vec![]));
            assert_eq!(got[2], (Kind::Batch, vec![9; 5000]));
        }
    }

    #[test]
    fn many_frames_go_out_in_one_gathering_write() {
        let mut tx = sender();
        for i in 0..100u8 {
            tx.push(Kind::Encoded, vec![i; 10]).unwrap();
        }
        let mut sink = ChokedSink::new(usize::MAX);
        assert_eq!(tx.flush(&mut sink).unwrap(), Progress::Done);
        assert_eq!(sink.calls, 1);
        assert_eq!(decode_all(sink.taken).len(), 100);
    }

    #[test]
    fn more_frames_than_iovecs_need_several_writes() {
        let mut tx = sender();
        for _ in 0..MAX_IOVECS {
            tx.push(Kind::Encoded, vec![1]).unwrap();
        }
        let mut sink = ChokedSink::new(usize::MAX);
        flush_all(&mut tx, &mut sink);
        assert!(sink.calls >= 3, "{} calls", sink.calls);
        assert_eq!(decode_all(sink.taken).len(), MAX_IOVECS);
    }

    #[test]
    fn mid_frame_is_known() {
        let mut tx = sender();
        tx.push(Kind::Encoded, vec![0; 100]).unwrap();
        assert!(!tx.is_mid_frame());
        let mut sink = ChokedSink::new(20);
        assert_eq!(tx.flush(&mut sink).unwrap(), Progress::WouldBlock);
        assert!(tx.is_mid_frame());
        tx.discard();
        assert!(!tx.has_pending());
    }

    #[test]
    fn write_errors_keep_the_queue() {
        let mut tx = sender();
        tx.push(Kind::Encoded, b"x".to_vec()).unwrap();
        let mut sink = ChokedSink::new(100);
        sink.fail = Some(io::ErrorKind::BrokenPipe);
        let err = tx.flush(&mut sink).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        assert!(tx.has_pending());
    }

    #[test]
    fn no_write_offers_more_than_one_chunk() {
        let big = vec![7u8; 3 * MAX_IO_CHUNK + 5];
        let mut tx = sender();
        tx.push(Kind::Bytes, big.clone()).unwrap();
        tx.push(Kind::Encoded, b"after".to_vec()).unwrap();
        let mut sink = ChokedSink::new(usize::MAX);
        flush_all(&mut tx, &mut sink);
        assert!(
            sink.largest_offer <= MAX_IO_CHUNK + HEADER_LEN,
            "{}",
            sink.largest_offer
        );
        let got = decode_all(sink.taken);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].1, big);
        assert_eq!(got[1].1, b"after");
    }

    #[test]
    fn long_flushes_ask_for_yields() {
        let mut tx = Sender::new(Budget::new(Some(std::time::Duration::ZERO)));
        tx.push(Kind::Bytes, vec![0u8; 1 << 20]).unwrap();
        let mut sink = ChokedSink::new(1024);
        let mut yields = 0;
        loop {
            match tx.flush(&mut sink).unwrap() {
                Progress::Done => break,
                Progress::Yield => yields += 1,
                Progress::WouldBlock => {}
            }
        }
        assert!(yields > 0);
        assert_eq!(sink.taken.len(), HEADER_LEN + (1 << 20));
    }

    proptest! {
        #[test]
        fn any_sequence_of_frames_round_trips(
            payloads in proptest::collection::vec(
                proptest::collection::vec(any::<u8>(), 0..40_000), 0..8),
            per_call in 1usize..70_000,
        ) {
            let mut tx = sender();
            for p in &payloads {
                tx.push(Kind::Encoded, p.clone()).unwrap();
            }
            let mut sink = ChokedSink::new(per_call);
            flush_all(&mut tx, &mut sink);
            let got: Vec<Vec<u8>> = decode_all(sink.taken).into_iter().map(|m| m.1).collect();
            prop_assert_eq!(got, payloads);
        }
    }
}
