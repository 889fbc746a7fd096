//! The objects Python drives: one reader and one writer per channel. Each call does what the
//! descriptor allows right now and reports the rest; waiting is the Python layer's job.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::ptr::NonNull;
use std::time::Duration;

use gipc_wire::budget::{Budget, DEFAULT_SLICE};
use gipc_wire::frame::Kind;
use gipc_wire::growth::{grow_pipe, Grown};
use gipc_wire::io::{
    channel_ends, check_end, set_nonblocking_cloexec, End, FdReader, FdWriter, FdsError,
    ReceivedFds, SocketReader, Transport, BULK_MIN, MAX_FDS,
};
use gipc_wire::recv::{Event, Payload, PayloadBuf, Receiver};
use gipc_wire::send::{Progress, SendError, Sender};
use gipc_wire::sigpipe::without_sigpipe;
use gipc_wire::spin::{SpinPolicy, REPLY_SPIN};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use pyo3::{ffi, IntoPyObjectExt};

use crate::buffer::HeldView;
use crate::errors;

fn kind_from(value: u8) -> PyResult<Kind> {
    Kind::from_u8(value).ok_or_else(|| PyValueError::new_err(format!("unknown kind {value}")))
}

/// A payload queued for writing: a `bytes` object, or any other object's contiguous buffer
/// (`bytearray`, `memoryview`, `array.array`, NumPy arrays), written from where it lies.
struct HeldBytes {
    _owner: Owner,
    data: NonNull<u8>,
    len: usize,
}

/// What keeps a queued payload's memory alive and in place.
enum Owner {
    Bytes(#[allow(dead_code)] Py<PyBytes>),
    /// A buffer export: while it is held, the exporter may not move or free the memory
    /// (a `bytearray` refuses to resize), and dropping it releases the export.
    Buffer(#[allow(dead_code)] HeldView),
}

// SAFETY: `_owner` keeps the memory alive and in place for as long as this value exists
// (an immutable `bytes`, or an exported buffer, which the buffer protocol forbids the
// exporter to move or free until released), whichever thread reads it. Only the writing
// system calls read it, with the GIL held.
unsafe impl Send for HeldBytes {}
// SAFETY: as above; shared access only ever reads.
unsafe impl Sync for HeldBytes {}

impl HeldBytes {
    fn new(bytes: &Bound<'_, PyBytes>) -> Self {
        let slice = bytes.as_bytes();
        HeldBytes {
            data: NonNull::from(slice).cast(),
            len: slice.len(),
            _owner: Owner::Bytes(bytes.clone().unbind()),
        }
    }

    /// `bytes` as they are, or a contiguous buffer of any other object; `TypeError`
    /// naming the type for anything else.
    fn from_object(payload: &Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok(bytes) = payload.cast::<PyBytes>() {
            return Ok(Self::new(bytes));
        }
        let type_name = || {
            payload
                .get_type()
                .name()
                .map_or_else(|_| "?".to_owned(), |name| name.to_string())
        };
        let buffer = HeldView::get(payload).map_err(|_| {
            PyTypeError::new_err(format!(
                "a payload must be bytes or a contiguous bytes-like object, not {}",
                type_name()
            ))
        })?;
        let (data, len) = (buffer.data(), buffer.len());
        Ok(HeldBytes {
            data,
            len,
            _owner: Owner::Buffer(buffer),
        })
    }
}

impl AsRef<[u8]> for HeldBytes {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: see the `Send` impl: valid and alive while `self` is.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr(), self.len) }
    }
}

/// A `bytes` object that a large payload is read into before anyone else sees it.
struct FillingBytes {
    owner: Py<PyBytes>,
    data: NonNull<u8>,
    len: usize,
}

// SAFETY: the object is reachable only through `owner` until the frame is complete, so no
// other code can observe it while it is written; the pointer stays valid while `owner` lives.
unsafe impl Send for FillingBytes {}
// SAFETY: as above; `as_mut_slice` needs `&mut self`, so there is never shared mutation.
unsafe impl Sync for FillingBytes {}

impl FillingBytes {
    /// A new `bytes` object of `len` uninitialised bytes (CPython's documented way to build
    /// one in place), or `None` when it cannot be allocated.
    fn allocate(py: Python<'_>, len: usize) -> Option<Self> {
        let size = isize::try_from(len).ok()?;
        // SAFETY: a null source with a length asks CPython for an uninitialised object, which
        // we fully overwrite before it is handed to Python code.
        let raw = unsafe { ffi::PyBytes_FromStringAndSize(std::ptr::null(), size) };
        // SAFETY: `raw` is a new reference or null (with an exception set).
        let owned = match unsafe { Bound::from_owned_ptr_or_err(py, raw) } {
            Ok(obj) => obj,
            Err(_) => return None, // MemoryError: reported by the caller with the size
        };
        let bytes = owned.cast_into::<PyBytes>().ok()?;
        // SAFETY: `bytes` is a bytes object; its buffer holds `len` bytes plus a NUL.
        let data = unsafe { ffi::PyBytes_AsString(bytes.as_ptr()) };
        Some(FillingBytes {
            data: NonNull::new(data.cast())?,
            len,
            owner: bytes.unbind(),
        })
    }
}

impl PayloadBuf for FillingBytes {
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: see the `Send` impl: exclusively ours, valid for `len` bytes.
        unsafe { std::slice::from_raw_parts_mut(self.data.as_ptr(), self.len) }
    }
}

/// A `Progress` (the result of a send, or of a receive that has no message) for Python.
fn status(py: Python<'_>, progress: Progress) -> PyResult<Py<PyAny>> {
    (progress as u8).into_py_any(py)
}

/// The read end of a channel.
#[pyclass(module = "gipc._core")]
pub struct Reader {
    /// The descriptors; `None` once closed.
    end: Option<End>,
    transport: Transport,
    rx: Receiver<FillingBytes>,
    spin: SpinPolicy,
    /// Descriptors received on a socket lane and not yet handed out with their message
    /// (see `Kind::Handles`), with a mark where the kernel dropped some; closed with the
    /// reader.
    fds: ReceivedFds,
    /// Whether messages may carry descriptors to this reader (`Kind::Handles`). A reader
    /// that refuses them (one whose codecs are not pickle: its peer may be untrusted)
    /// closes every descriptor as it comes, so that a peer cannot fill this process's
    /// table with descriptors attached to ordinary messages.
    takes_fds: bool,
}

#[pymethods]
impl Reader {
    /// The next message as `(kind, payload)`, else `WOULD_BLOCK` (wait until the descriptor
    /// is readable) or `YIELD` (let the event loop run first).
    ///
    /// Before answering `WOULD_BLOCK`, looks again for up to `spin_us` microseconds while
    /// that keeps paying off (see `gipc_wire::spin`): a reply that is on its way is then
    /// taken without a trip through the event loop.
    fn try_recv(&mut self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match self.receive(py)? {
            Some(received) => received.into_python(py),
            None => status(py, Progress::WouldBlock),
        }
    }

    /// How long `try_recv` may look again before saying "wait" (0: never; the default is
    /// `REPLY_SPIN_US`, within the limits of `spin_streams_only`).
    #[getter]
    fn spin_us(&self) -> u64 {
        self.spin.limit().map_or(0, |d| d.as_micros() as u64)
    }

    #[setter]
    fn set_spin_us(&mut self, value: u64) {
        self.spin.set_limit(spin_limit(value));
    }

    /// Whether `try_recv` spins only in the middle of a stream (after two messages since
    /// the last wait, or a spin that caught one), as one-way readers do, or on every wait,
    /// as a reader that expects replies does (see `gipc_wire::spin`).
    #[getter]
    fn spin_streams_only(&self) -> bool {
        self.spin.streams_only()
    }

    #[setter]
    fn set_spin_streams_only(&mut self, value: bool) {
        self.spin.set_streams_only(value);
    }

    fn fileno(&self) -> PyResult<i32> {
        Ok(open_end(&self.end)?.frame.as_raw_fd())
    }

    /// Every descriptor of this end: the frame lane's, then the bulk lane's if any.
    fn filenos(&self) -> PyResult<Vec<i32>> {
        Ok(open_end(&self.end)?.raw_fds())
    }

    /// The descriptor to wait for (readable) after `try_recv` answered `WOULD_BLOCK`. For
    /// the rest of a large payload, with `read_aside` on, this starts the thread that reads
    /// it and gives that thread's descriptor (see `reading_aside`).
    fn wait_fileno(&mut self) -> PyResult<i32> {
        let end = self.end.as_ref().ok_or_else(errors::closed)?;
        if self.rx.wants_aside() {
            // SAFETY: the lane's descriptor is closed only by `close` or when the reader is
            // dropped, and both halt the thread first.
            unsafe { self.rx.start_aside(end.lane(self.rx.waiting_lane())) };
        }
        if let Some(fd) = self.rx.aside_fd() {
            return Ok(fd.as_raw_fd());
        }
        Ok(end.lane(self.rx.waiting_lane()).as_raw_fd())
    }

    /// Whether the rest of a large payload (8 MiB or more) is read on a thread of its own
    /// while the caller waits, so that the event loop's thread never waits for the page
    /// faults of filling it (see `gipc_wire::aside`). Off for a new core reader; gipc's
    /// handles turn it on.
    #[getter]
    fn read_aside(&self) -> bool {
        self.rx.read_aside()
    }

    #[setter]
    fn set_read_aside(&mut self, value: bool) {
        if !value {
            self.rx.halt_aside();
        }
        self.rx.set_read_aside(value);
    }

    /// Whether `wait_fileno` is the descriptor of a thread reading a payload (a new one for
    /// each payload, readable once the thread is done, or stopped and not yet taken over
    /// by `try_recv`).
    #[getter]
    fn reading_aside(&self) -> bool {
        self.rx.aside_fd().is_some()
    }

    /// Stops the thread reading aside, if any, keeping what it read: a greenlet waiting on
    /// its descriptor wakes, and its next `try_recv` goes on from there (before a fork).
    fn halt_aside(&mut self) {
        self.rx.halt_aside();
    }

    /// Whether messages may carry descriptors to this reader (True by default); a reader
    /// that refuses them closes every descriptor that comes, and a message that carries
    /// some comes without them.
    #[getter]
    fn takes_descriptors(&self) -> bool {
        self.takes_fds
    }

    #[setter]
    fn set_takes_descriptors(&mut self, value: bool) {
        self.takes_fds = value;
        if !value {
            self.fds.clear();
        }
    }

    /// Closes the descriptors (after stopping a thread reading aside, which reads one of
    /// them); returns False if they were closed already.
    fn close(&mut self) -> bool {
        let _ = self.rx.collect_aside();
        self.fds.clear();
        self.end.take().is_some()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.end.is_none()
    }

    /// "hybrid", "socket" or "pipe".
    #[getter]
    fn transport(&self) -> &'static str {
        self.transport.name()
    }

    #[getter]
    fn max_message_size(&self) -> u64 {
        self.rx.max_len()
    }

    #[setter]
    fn set_max_message_size(&mut self, value: u64) {
        self.rx.set_max_len(value);
    }

    /// Bytes received and not yet returned as messages.
    #[getter]
    fn buffered(&self) -> usize {
        self.rx.buffered()
    }

    /// What another process needs, besides `filenos()`, to go on reading this channel with
    /// `reader_from_fds`: the transport's name and the bytes received but not yet returned
    /// as messages. Changes nothing; `GIPCError` when the end cannot move now.
    fn transfer_state<'py>(
        &mut self,
        py: Python<'py>,
    ) -> PyResult<(&'static str, Bound<'py, PyBytes>)> {
        open_end(&self.end)?;
        if !self.fds.is_empty() {
            return Err(errors::cannot_transfer(
                "descriptors received with a message are not yet returned",
            ));
        }
        let unread = self.rx.unread().map_err(errors::cannot_transfer)?;
        Ok((self.transport.name(), PyBytes::new(py, &unread)))
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // Before the fields go: the thread reads from `end`, which is dropped first.
        let _ = self.rx.collect_aside();
    }
}

impl Reader {
    /// `try_recv` for Rust callers (the handle's `get`, see `fastcall`): `None` for
    /// `WOULD_BLOCK`.
    pub(crate) fn receive(&mut self, py: Python<'_>) -> PyResult<Option<Received>> {
        let end = self.end.as_ref().ok_or_else(errors::closed)?;
        let (rx, fds, transport) = (&mut self.rx, &mut self.fds, self.transport);
        let takes_fds = self.takes_fds;
        if rx.caught_up() {
            self.spin.pause_in_stream();
        }
        // A spin looks with `poll` before it reads again, unless part of a message is here
        // already (the rest of a payload, or one a thread of gipc's reads aside): then
        // whether the descriptor is readable does not tell whether the message is done.
        let partial = std::cell::Cell::new(false);
        let answer = self.spin.attempt_when(
            || partial.get() || end.has_input_now(),
            || {
                let answer = receive_once(py, rx, end, transport, fds, takes_fds);
                partial.set(rx.buffered() > 0);
                answer
            },
        );
        if !takes_fds {
            self.fds.clear();
        }
        let answer = answer?;
        if answer.is_none() {
            self.rx.will_wait();
        }
        Ok(answer)
    }
}

/// What one look at a reader's descriptors found.
pub(crate) enum Received {
    /// A message without descriptors.
    Message { kind: Kind, payload: Py<PyBytes> },
    /// A `Kind::Handles` message and the descriptors that came with it, now the caller's.
    Handles { payload: Py<PyBytes>, fds: Vec<i32> },
    /// Nothing yet, but the time slice is used up: let the event loop run first.
    Yield,
}

impl Received {
    /// As `try_recv` returns it: `(kind, payload)`, `(kind, payload, fds)` or `YIELD`.
    pub(crate) fn into_python(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match self {
            Received::Message { kind, payload } => (kind as u8, payload).into_py_any(py),
            Received::Handles { payload, fds } => {
                (Kind::Handles as u8, payload, fds).into_py_any(py)
            }
            Received::Yield => status(py, Progress::Yield),
        }
    }
}

/// One look at the descriptors: `Some(message or YIELD)`, or `None` when there is nothing.
/// A socket lane is read with `recvmsg`, keeping the descriptors that come (into `fds`).
fn receive_once(
    py: Python<'_>,
    rx: &mut Receiver<FillingBytes>,
    end: &End,
    transport: Transport,
    fds: &mut ReceivedFds,
    takes_fds: bool,
) -> PyResult<Option<Received>> {
    let alloc = |len| FillingBytes::allocate(py, len);
    let event = match (transport, &end.bulk) {
        (Transport::Socket, _) => {
            let mut source = SocketReader {
                fd: end.frame.as_fd(),
                received: fds,
            };
            rx.poll_lanes(&mut source, None::<&mut FdReader<'_>>, alloc)
        }
        (_, Some(bulk)) => {
            let mut bulk_source = SocketReader {
                fd: bulk.as_fd(),
                received: fds,
            };
            let mut source = FdReader(end.frame.as_fd());
            rx.poll_lanes(&mut source, Some(&mut bulk_source), alloc)
        }
        (_, None) => {
            let mut source = FdReader(end.frame.as_fd());
            rx.poll_lanes(&mut source, None::<&mut FdReader<'_>>, alloc)
        }
    }
    .map_err(errors::recv_error)?;
    match event {
        Event::Message { kind, payload } => {
            let payload = match payload {
                Payload::Buffered(data) => PyBytes::new(py, data).unbind(),
                Payload::Owned(filled) => filled.owner,
            };
            if kind == Kind::Handles {
                if !takes_fds {
                    // Refused (with the reason) by the Python layer; its descriptors, if
                    // any came, are closed by the caller.
                    return Ok(Some(Received::Handles {
                        payload,
                        fds: Vec::new(),
                    }));
                }
                let fds = take_fds(payload.bind(py).as_bytes(), fds)?;
                return Ok(Some(Received::Handles { payload, fds }));
            }
            Ok(Some(Received::Message { kind, payload }))
        }
        Event::WouldBlock => Ok(None),
        Event::Yield => Ok(Some(Received::Yield)),
    }
}

/// The descriptors of a `Kind::Handles` message, whose payload starts with their count, as
/// numbers the caller now owns; `GIPCError` when they did not all come. The message is
/// consumed either way, and those of its descriptors that came are closed: one whose
/// descriptors the kernel dropped (the process at its descriptor limit) fails alone, and
/// the messages behind it are read normally (see `ReceivedFds`).
fn take_fds(payload: &[u8], fds: &mut ReceivedFds) -> PyResult<Vec<i32>> {
    let count = payload
        .get(..4)
        .map(|raw| u32::from_le_bytes(raw.try_into().expect("four bytes")) as usize);
    let taken = match count {
        Some(count) => fds.take(count),
        // Not even a count: no gipc writer sent this, and no descriptor can be matched.
        None => {
            let came = fds.len();
            fds.clear();
            Err(FdsError::Missing { came })
        }
    };
    Ok(taken
        .map_err(errors::fds_error)?
        .into_iter()
        .map(IntoRawFd::into_raw_fd)
        .collect())
}

/// The descriptors of an end that is open, else `GIPCClosed`.
fn open_end(end: &Option<End>) -> PyResult<&End> {
    end.as_ref().ok_or_else(errors::closed)
}

fn spin_limit(us: u64) -> Option<Duration> {
    (us > 0).then(|| Duration::from_micros(us))
}

/// The write end of a channel.
#[pyclass(module = "gipc._core")]
pub struct Writer {
    /// The descriptors; `None` once closed.
    end: Option<End>,
    transport: Transport,
    tx: Sender<HeldBytes>,
    /// What growing the pipe took from this process's share (see `gipc_wire::growth`).
    grown: Option<Grown>,
    /// Growing was tried once: whatever came of it, it is not tried again.
    grow_tried: bool,
}

impl Writer {
    fn new(transport: Transport, end: End) -> Self {
        let budget = Budget::new(Some(DEFAULT_SLICE));
        let tx = match end.bulk {
            Some(_) => Sender::with_bulk_lane(budget, BULK_MIN),
            None => Sender::new(budget),
        };
        Writer {
            end: Some(end),
            transport,
            tx,
            grown: None,
            grow_tried: false,
        }
    }

    fn flush(&mut self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let mut progress = self.flush_once()?;
        if progress == Progress::WouldBlock && self.make_room()? {
            progress = self.flush_once()?;
        }
        status(py, progress)
    }

    fn flush_once(&mut self) -> PyResult<Progress> {
        self.write_with(|tx, sink, bulk| tx.flush_lanes(sink, bulk).map_err(SendError::Io))
    }

    /// Runs `write` (a flush of the sender, or a push and flush) on this end's lanes.
    fn write_with(
        &mut self,
        write: impl FnOnce(
            &mut Sender<HeldBytes>,
            &mut FdWriter<'_>,
            Option<&mut FdWriter<'_>>,
        ) -> Result<Progress, SendError>,
    ) -> PyResult<Progress> {
        let end = open_end(&self.end)?;
        let frame_lane = self.transport.frame_lane();
        let mut sink = FdWriter::new(end.frame.as_fd(), frame_lane);
        let mut bulk_sink = end
            .bulk
            .as_ref()
            .map(|bulk| FdWriter::new(bulk.as_fd(), Transport::Socket));
        let tx = &mut self.tx;
        // An I/O error apart, so that the shield below sees a broken pipe.
        let run = || match write(tx, &mut sink, bulk_sink.as_mut()) {
            Ok(progress) => Ok(Ok(progress)),
            Err(SendError::Frame(err)) => Ok(Err(err)),
            Err(SendError::Io(err)) => Err(err),
        };
        let result = match frame_lane {
            // A pipe write has no MSG_NOSIGNAL (only RWF_NOSIGNAL on recent kernels): one
            // shield for the whole flush, however many writes it makes.
            Transport::Pipe => without_sigpipe(run),
            _ => run(),
        };
        result
            .map_err(errors::os_error)?
            .map_err(errors::frame_error)
    }

    /// On a pipe-only channel, grows the pipe the first time a large payload finds it full;
    /// true if the pipe has more room now. Small messages never grow it: a pipe's pages
    /// count against a budget shared by all of the user's programs.
    fn make_room(&mut self) -> PyResult<bool> {
        let large = self.tx.front_payload_len().unwrap_or(0) >= BULK_MIN;
        if self.transport != Transport::Pipe || self.grow_tried || !large {
            return Ok(false);
        }
        self.grow_tried = true;
        let end = open_end(&self.end)?;
        self.grown = grow_pipe(end.frame.as_fd());
        Ok(self.grown.is_some())
    }
}

impl Writer {
    /// Queues one frame and writes what the descriptor takes now. Returns `DONE`,
    /// `WOULD_BLOCK` (wait until writable, then `try_flush`) or `YIELD` (let the loop run,
    /// then `try_flush`). Python calls it as `Writer.try_send`, through `crate::fastcall`.
    pub fn try_send(
        &mut self,
        py: Python<'_>,
        kind: u8,
        payload: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        let progress = self.send(kind, payload)?;
        status(py, progress)
    }

    /// `try_send`'s work, for Rust callers.
    pub fn send(&mut self, kind: u8, payload: &Bound<'_, PyAny>) -> PyResult<Progress> {
        open_end(&self.end)?;
        let held = HeldBytes::from_object(payload)?;
        let kind = kind_from(kind)?;
        let mut progress =
            self.write_with(|tx, sink, bulk| tx.push_and_flush(kind, held, sink, bulk))?;
        if progress == Progress::WouldBlock && self.make_room()? {
            progress = self.flush_once()?;
        }
        Ok(progress)
    }
}

#[pymethods]
impl Writer {
    /// Like `try_send` for a list of payloads, all written with as few system calls as the
    /// descriptor allows.
    fn try_send_many(
        &mut self,
        py: Python<'_>,
        kind: u8,
        payloads: &Bound<'_, PyList>,
    ) -> PyResult<Py<PyAny>> {
        open_end(&self.end)?;
        let kind = kind_from(kind)?;
        // Check every item first so a bad one queues nothing.
        let items: Vec<HeldBytes> = payloads
            .iter()
            .map(|item| HeldBytes::from_object(&item))
            .collect::<PyResult<_>>()?;
        for item in items {
            self.tx.push(kind, item).map_err(errors::frame_error)?;
        }
        self.flush(py)
    }

    /// Like `try_send` for a message that carries descriptors: copies of `fds` travel with
    /// it (`SCM_RIGHTS`) on the channel's socket lane, and the reader's `try_recv` answers
    /// `(kind, payload, fds)`. `kind` must be `KIND_HANDLES` and `payload` start with the
    /// count of `fds`, a little-endian u32. `GIPCError` on a "pipe" channel, which has no
    /// socket lane; nothing is queued then.
    fn try_send_fds(
        &mut self,
        py: Python<'_>,
        kind: u8,
        payload: &Bound<'_, PyAny>,
        fds: Vec<i32>,
    ) -> PyResult<Py<PyAny>> {
        open_end(&self.end)?;
        if self.transport == Transport::Pipe {
            return Err(errors::GIPCError::new_err(
                "a 'pipe' channel cannot carry descriptors: it has no socket lane",
            ));
        }
        let kind = kind_from(kind)?;
        let held = HeldBytes::from_object(payload)?;
        let count = held
            .as_ref()
            .get(..4)
            .map(|raw| u32::from_le_bytes(raw.try_into().expect("four bytes")) as usize);
        if kind != Kind::Handles || count != Some(fds.len()) || fds.len() > MAX_FDS {
            return Err(PyValueError::new_err(format!(
                "descriptors go in a KIND_HANDLES frame whose payload starts with their count, \
                 at most {MAX_FDS}"
            )));
        }
        let copies = fds
            .iter()
            .map(|&fd| {
                // SAFETY: F_GETFD only reads the descriptor table; any integer is valid.
                if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
                    return Err(errors::os_error(std::io::Error::from_raw_os_error(
                        libc::EBADF,
                    )));
                }
                // SAFETY: open (checked just above, and nothing runs in between that could
                // close it: we hold the GIL); borrowed only to make our own copy.
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                fd.try_clone_to_owned().map_err(errors::os_error)
            })
            .collect::<PyResult<Vec<OwnedFd>>>()?;
        self.tx
            .push_with_fds(kind, held, copies)
            .map_err(errors::frame_error)?;
        self.flush(py)
    }

    /// Continues writing what is queued.
    fn try_flush(&mut self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.flush(py)
    }

    /// "hybrid", "socket" or "pipe".
    #[getter]
    fn transport(&self) -> &'static str {
        self.transport.name()
    }

    /// True when a frame is partly written: closing now would tear it for the reader.
    #[getter]
    fn mid_frame(&self) -> bool {
        self.tx.is_mid_frame()
    }

    fn fileno(&self) -> PyResult<i32> {
        Ok(open_end(&self.end)?.frame.as_raw_fd())
    }

    /// Every descriptor of this end: the frame lane's, then the bulk lane's if any.
    fn filenos(&self) -> PyResult<Vec<i32>> {
        Ok(open_end(&self.end)?.raw_fds())
    }

    /// The descriptor to wait for (writable) after `WOULD_BLOCK`.
    fn wait_fileno(&self) -> PyResult<i32> {
        Ok(open_end(&self.end)?
            .lane(self.tx.waiting_lane())
            .as_raw_fd())
    }

    /// Forgets queued frames and closes the descriptors; returns False if they were closed
    /// already.
    fn close(&mut self) -> bool {
        self.tx.discard();
        self.grown = None;
        self.end.take().is_some()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.end.is_none()
    }

    /// The transport's name, for `writer_from_fds` in another process; `GIPCError` while
    /// queued frames are not entirely written (they would stay behind).
    fn transfer_state(&self) -> PyResult<&'static str> {
        open_end(&self.end)?;
        if self.tx.has_pending() {
            return Err(errors::cannot_transfer(
                "queued messages are not entirely written",
            ));
        }
        Ok(self.transport.name())
    }
}

fn parse_transport(name: &str) -> PyResult<Transport> {
    Transport::from_name(name).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown transport {name:?}: use 'hybrid', 'socket' or 'pipe'"
        ))
    })
}

/// Takes `fds` (frame lane first) as one end of a `transport` channel, once they are checked
/// and made non-blocking and close-on-exec. On any error the caller still owns them.
fn adopt(transport: Transport, fds: &[i32], reading: bool) -> PyResult<End> {
    for &fd in fds {
        // SAFETY: F_GETFD only reads the descriptor table; any integer is a valid argument.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            return Err(errors::os_error(std::io::Error::from_raw_os_error(
                libc::EBADF,
            )));
        }
    }
    // SAFETY: each descriptor was just seen open, and stays open while these borrows live:
    // they end within this call, during which we hold the GIL and close nothing.
    let borrowed: Vec<BorrowedFd<'_>> = fds
        .iter()
        .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) })
        .collect();
    check_end(transport, &borrowed, reading).map_err(errors::end_error)?;
    for &fd in &borrowed {
        set_nonblocking_cloexec(fd).map_err(errors::os_error)?;
    }
    // SAFETY: the caller hands these descriptors over (documented in the .pyi); they are
    // open and distinct (checked above), so each gets exactly one owner, which closes it.
    let mut owned = fds.iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(End {
        frame: owned.next().expect("check_end counted at least one"),
        bulk: owned.next(),
    })
}

/// Rebuilds a channel's read end from descriptors another process had (see
/// `Reader.transfer_state`): `buffered` are the bytes that reader had received and not
/// returned, returned first here.
#[pyfunction]
#[pyo3(signature = (transport, fds, buffered = &[][..], max_message_size = 1 << 32))]
pub fn reader_from_fds(
    transport: &str,
    fds: Vec<i32>,
    buffered: &[u8],
    max_message_size: u64,
) -> PyResult<Reader> {
    let transport = parse_transport(transport)?;
    let end = adopt(transport, &fds, true)?;
    let budget = Budget::new(Some(DEFAULT_SLICE));
    Ok(Reader {
        end: Some(end),
        transport,
        rx: Receiver::resume(max_message_size, budget, buffered),
        spin: SpinPolicy::for_streams(Some(REPLY_SPIN)),
        fds: ReceivedFds::new(),
        takes_fds: true,
    })
}

/// Rebuilds a channel's write end from descriptors another process had.
#[pyfunction]
pub fn writer_from_fds(transport: &str, fds: Vec<i32>) -> PyResult<Writer> {
    let transport = parse_transport(transport)?;
    let end = adopt(transport, &fds, false)?;
    Ok(Writer::new(transport, end))
}

/// Creates a one-way channel and returns its `(Reader, Writer)`.
#[pyfunction]
#[pyo3(signature = (transport = "hybrid", max_message_size = 1 << 32))]
pub fn channel(transport: &str, max_message_size: u64) -> PyResult<(Reader, Writer)> {
    let transport = parse_transport(transport)?;
    let (read_end, write_end) = channel_ends(transport).map_err(errors::os_error)?;
    Ok((
        Reader {
            end: Some(read_end),
            transport,
            rx: Receiver::new(max_message_size, Budget::new(Some(DEFAULT_SLICE))),
            spin: SpinPolicy::for_streams(Some(REPLY_SPIN)),
            fds: ReceivedFds::new(),
            takes_fds: true,
        },
        Writer::new(transport, write_end),
    ))
}
