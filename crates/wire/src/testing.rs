//! Scripted descriptors for unit tests: they return data in the pieces a test chooses, so
//! partial reads and writes are exercised deterministically.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use crate::io::{ReadSource, WriteSink};

enum Piece {
    Data(Vec<u8>),
    Fail(io::ErrorKind),
    /// "Would block" once, then the next piece (a writer a little behind its reader).
    Pause,
}

/// A source that hands out scripted pieces, each possibly over several reads, then says
/// "would block" forever (or reports end of stream after [`ScriptedSource::then_eof`]).
pub struct ScriptedSource {
    pieces: VecDeque<Piece>,
    eof: bool,
    reads: usize,
    /// The largest buffer any read offered to fill.
    pub largest_read: usize,
}

impl ScriptedSource {
    pub fn whole(data: Vec<u8>) -> Self {
        Self::from_pieces(vec![Piece::Data(data)])
    }

    /// `data` cut at the given offsets, one piece per read at most.
    pub fn split(data: &[u8], cuts: &[usize]) -> Self {
        let mut pieces = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&data.len())) {
            pieces.push(Piece::Data(data[from..cut].to_vec()));
            from = cut;
        }
        Self::from_pieces(pieces)
    }

    pub fn chunks(data: &[u8], size: usize) -> Self {
        Self::from_pieces(data.chunks(size).map(|c| Piece::Data(c.to_vec())).collect())
    }

    /// Each of `pieces` in one read, with a "would block" after each.
    pub fn paced(pieces: &[Vec<u8>]) -> Self {
        Self::from_pieces(
            pieces
                .iter()
                .flat_map(|p| [Piece::Data(p.clone()), Piece::Pause])
                .collect(),
        )
    }

    pub fn failing(kind: io::ErrorKind) -> Self {
        Self::from_pieces(vec![Piece::Fail(kind)])
    }

    pub fn then_eof(mut self) -> Self {
        self.eof = true;
        self
    }

    pub fn is_exhausted(&self) -> bool {
        self.pieces.is_empty()
    }

    pub fn reads(&self) -> usize {
        self.reads
    }

    fn from_pieces(pieces: Vec<Piece>) -> Self {
        ScriptedSource {
            pieces: pieces.into(),
            eof: false,
            reads: 0,
            largest_read: 0,
        }
    }
}

impl ReadSource for ScriptedSource {
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reads += 1;
        self.largest_read = self.largest_read.max(buf.len());
        loop {
            match self.pieces.front_mut() {
                None if self.eof => return Ok(0),
                None => return Err(io::ErrorKind::WouldBlock.into()),
                Some(Piece::Fail(kind)) => return Err((*kind).into()),
                Some(Piece::Pause) => {
                    self.pieces.pop_front();
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Some(Piece::Data(data)) if data.is_empty() => {
                    self.pieces.pop_front();
                }
                Some(Piece::Data(data)) => {
                    let n = data.len().min(buf.len());
                    buf[..n].copy_from_slice(&data[..n]);
                    data.drain(..n);
                    if data.is_empty() {
                        // Exhausted as soon as the last byte is taken, not at the next read.
                        self.pieces.pop_front();
                    }
                    return Ok(n);
                }
            }
        }
    }
}

/// A sink that takes at most `per_call` bytes per write and says "would block" on every other
/// call, recording what it took.
pub struct ChokedSink {
    pub taken: Vec<u8>,
    pub per_call: usize,
    pub calls: usize,
    pub fail: Option<io::ErrorKind>,
    /// The most bytes any write offered.
    pub largest_offer: usize,
    /// The most buffers any write offered.
    pub most_buffers: usize,
    /// For each write that passed descriptors: where in `taken` its bytes start, and how
    /// many descriptors it passed.
    pub fds_at: Vec<(usize, usize)>,
    block_next: bool,
}

impl ChokedSink {
    pub fn new(per_call: usize) -> Self {
        ChokedSink {
            taken: Vec::new(),
            per_call,
            calls: 0,
            fail: None,
            largest_offer: 0,
            most_buffers: 0,
            fds_at: Vec::new(),
            block_next: false,
        }
    }
}

impl WriteSink for ChokedSink {
    fn write_some(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.calls += 1;
        let offered: usize = bufs.iter().map(|b| b.len()).sum();
        self.largest_offer = self.largest_offer.max(offered);
        self.most_buffers = self.most_buffers.max(bufs.len());
        if let Some(kind) = self.fail {
            return Err(kind.into());
        }
        if self.block_next {
            self.block_next = false;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.block_next = true;
        let mut left = self.per_call;
        let mut n = 0;
        for buf in bufs {
            let take = buf.len().min(left);
            self.taken.extend_from_slice(&buf[..take]);
            left -= take;
            n += take;
            if left == 0 {
                break;
            }
        }
        Ok(n)
    }

    fn write_with_fds(
        &mut self,
        bufs: &[IoSlice<'_>],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> io::Result<usize> {
        let at = self.taken.len();
        let written = self.write_some(bufs)?;
        if written > 0 {
            self.fds_at.push((at, fds.len()));
        }
        Ok(written)
    }
}
