//! Descriptors: creating a channel, and the two non-blocking system calls the framing needs.
//!
//! Nothing here waits. A call that cannot make progress returns `ErrorKind::WouldBlock` and the
//! caller (gevent, through the Python layer) decides how to wait.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
use rustix::io::{fcntl_setfd, FdFlags};

use crate::frame::Lane;

/// Where frames come from: one `read` that may return fewer bytes than asked.
pub trait ReadSource {
    /// Reads into `buf`; `Ok(0)` means end of stream.
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// Where frames go: one gathering write that may take fewer bytes than offered.
pub trait WriteSink {
    fn write_some(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;

    /// One write that also passes `fds` (`SCM_RIGHTS`), with its first byte: only a socket
    /// can.
    fn write_with_fds(
        &mut self,
        _bufs: &[IoSlice<'_>],
        _fds: &[BorrowedFd<'_>],
    ) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "descriptors travel only on a socket",
        ))
    }
}

/// The most descriptors one message carries (Linux's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// What carries the bytes. The Python API is the same whichever is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// An anonymous pipe, of the system's default size until a large payload needs more room
    /// (see `growth`).
    Pipe,
    /// An `AF_UNIX` stream socket pair, used in one direction only.
    Socket,
    /// Both: frames go through a pipe, and payloads of [`BULK_MIN`] bytes or more through a
    /// socket pair beside it (the bulk lane, see `frame::Lane`). A pipe write of a small
    /// message is the cheaper system call (no socket buffer to allocate per write; measured
    /// 1.3-1.6x more small messages per second through gipc), while a socket moves
    /// large payloads 2-4x faster than a pipe, even one grown to 1 MiB (the kernel copies
    /// into a few large buffers instead of 4 KiB pages).
    Hybrid,
}

impl Transport {
    pub fn from_name(name: &str) -> Option<Transport> {
        match name {
            "pipe" => Some(Transport::Pipe),
            "socket" => Some(Transport::Socket),
            "hybrid" => Some(Transport::Hybrid),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Transport::Pipe => "pipe",
            Transport::Socket => "socket",
            Transport::Hybrid => "hybrid",
        }
    }

    /// What the frame lane is made of.
    pub fn frame_lane(self) -> Transport {
        match self {
            Transport::Hybrid => Transport::Pipe,
            other => other,
        }
    }
}

/// On a [`Transport::Hybrid`] channel, payloads at least this long take the bulk lane.
/// Below it a pipe is as fast, and one descriptor means one system call per message. Measured
/// (3 runs each, MB/s as a share of the C socket ceiling): with the threshold at 16 KiB,
/// 16 KiB messages 0.65 and 64 KiB ones 1.00; at 64 KiB, 0.38 and 0.79.
pub const BULK_MIN: usize = 16 << 10;

/// One end of a channel: the frame lane's descriptor, and the bulk lane's if it has one.
#[derive(Debug)]
pub struct End {
    pub frame: OwnedFd,
    pub bulk: Option<OwnedFd>,
}

impl End {
    /// The descriptor of `lane`: the bulk lane's if this end has one, else the frame lane's.
    pub fn lane(&self, lane: Lane) -> BorrowedFd<'_> {
        match (lane, &self.bulk) {
            (Lane::Bulk, Some(bulk)) => bulk.as_fd(),
            _ => self.frame.as_fd(),
        }
    }

    /// Whether a read on either lane would find something now (bytes, end of stream or an
    /// error), asked without reading. A spinning reader looks with this between reads: a
    /// `poll` does not take the pipe's lock, while every `read` that comes back empty holds
    /// it against the writer's next `write` (see [`crate::spin`]). When the kernel cannot
    /// say, the answer is yes, so that the caller reads and finds out.
    pub fn has_input_now(&self) -> bool {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [
            PollFd::new(&self.frame, PollFlags::IN),
            PollFd::new(self.bulk.as_ref().unwrap_or(&self.frame), PollFlags::IN),
        ];
        let lanes = if self.bulk.is_some() { 2 } else { 1 };
        !matches!(poll(&mut fds[..lanes], Some(&Timespec::default())), Ok(0))
    }

    /// Every descriptor of this end: the frame lane's, then the bulk lane's if any.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        std::iter::once(&self.frame)
            .chain(&self.bulk)
            .map(|fd| fd.as_raw_fd())
            .collect()
    }
}

/// Creates a one-way channel of any transport and returns its `(read end, write end)`.
pub fn channel_ends(transport: Transport) -> io::Result<(End, End)> {
    let (read_frame, write_frame) = channel(transport.frame_lane())?;
    let (read_bulk, write_bulk) = match transport {
        Transport::Hybrid => {
            let (r, w) = channel(Transport::Socket)?;
            (Some(r), Some(w))
        }
        _ => (None, None),
    };
    Ok((
        End {
            frame: read_frame,
            bulk: read_bulk,
        },
        End {
            frame: write_frame,
            bulk: write_bulk,
        },
    ))
}

/// Why descriptors handed in from elsewhere cannot be one end of a channel ([`check_end`]).
#[derive(Debug)]
pub enum EndError {
    /// Not as many descriptors as the transport has lanes.
    Count { expected: usize, got: usize },
    /// A descriptor is not what its lane is made of.
    Lane { fd: i32, expected: &'static str },
    /// `fstat`/`fcntl`/`getsockopt` failed (a descriptor that is not open: `EBADF`).
    Io(io::Error),
}

impl std::fmt::Display for EndError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndError::Count { expected, got } => write!(
                f,
                "this transport has {expected} descriptor(s) per end, got {got}"
            ),
            EndError::Lane { fd, expected } => write!(f, "descriptor {fd} is not {expected}"),
            EndError::Io(err) => err.fmt(f),
        }
    }
}

impl std::error::Error for EndError {}

impl From<rustix::io::Errno> for EndError {
    fn from(err: rustix::io::Errno) -> Self {
        EndError::Io(err.into())
    }
}

/// Checks that `fds` (frame lane first, then the bulk lane) can be the read end (`reading`)
/// or the write end of a `transport` channel: one descriptor per lane, each distinct, a pipe
/// lane a FIFO open in the right direction, a socket lane an `AF_UNIX` stream socket.
/// Changes nothing: a caller that is refused still owns its descriptors as they were.
pub fn check_end(
    transport: Transport,
    fds: &[BorrowedFd<'_>],
    reading: bool,
) -> Result<(), EndError> {
    let lanes: &[Transport] = match transport {
        Transport::Hybrid => &[Transport::Pipe, Transport::Socket],
        Transport::Pipe => &[Transport::Pipe],
        Transport::Socket => &[Transport::Socket],
    };
    if fds.len() != lanes.len() {
        return Err(EndError::Count {
            expected: lanes.len(),
            got: fds.len(),
        });
    }
    if fds.len() == 2 && fds[0].as_raw_fd() == fds[1].as_raw_fd() {
        return Err(EndError::Lane {
            fd: fds[1].as_raw_fd(),
            expected: "a second descriptor (both lanes name the same one)",
        });
    }
    for (&fd, lane) in fds.iter().zip(lanes) {
        let refuse = |expected| EndError::Lane {
            fd: fd.as_raw_fd(),
            expected,
        };
        match lane {
            Transport::Socket => {
                use rustix::net::{getsockname, sockopt::socket_type, AddressFamily, SocketType};
                let stream = matches!(socket_type(fd), Ok(t) if t == SocketType::STREAM);
                // getsockname rather than SO_DOMAIN, which macOS lacks.
                let unix = matches!(getsockname(fd), Ok(addr) if addr.address_family() == AddressFamily::UNIX);
                if !(stream && unix) {
                    return Err(refuse("an AF_UNIX stream socket"));
                }
            }
            _ => {
                let stat = rustix::fs::fstat(fd)?;
                if !rustix::fs::FileType::from_raw_mode(stat.st_mode).is_fifo() {
                    return Err(refuse("a pipe"));
                }
                let mode = fcntl_getfl(fd)? & OFlags::RWMODE;
                let wanted = if reading {
                    OFlags::RDONLY
                } else {
                    OFlags::WRONLY
                };
                if mode != wanted && mode != OFlags::RDWR {
                    return Err(refuse(if reading {
                        "a pipe's read end"
                    } else {
                        "a pipe's write end"
                    }));
                }
            }
        }
    }
    Ok(())
}

/// The most bytes one read or write system call may move. The kernel will copy tens of
/// megabytes in one call when that much is queued (seen: 23 MB in one 5 ms read of a
/// socket), and no time slice can interrupt a system call. Reading into a fresh buffer also
/// faults its pages in, inside the call: a 1 MiB read took 0.46 ms typically (and 3 ms when
/// the VM's host had to back the memory first). At 256 KiB a call stays near 0.1 ms, the time
/// slice is checked four times as often, and the extra calls cost nothing measurable
/// (64 MiB messages: 256 calls instead of 64, no throughput change in the benchmark).
pub const MAX_IO_CHUNK: usize = 256 << 10;

/// Pipe buffer asked for on Linux when a [`Transport::Pipe`] channel carries large payloads
/// (see `growth`): 1 MiB is the default `pipe-max-size` for unprivileged processes, and it
/// lets a bulk transfer move 16 times more per system call than 64 KiB. A hybrid channel's
/// pipe is never grown: its large payloads take the socket lane.
pub const PIPE_CAPACITY: usize = 1 << 20;

/// Socket buffer asked for; the kernel caps it at `net.core.wmem_max`/`rmem_max`.
pub const SOCKET_BUFFER: usize = 1 << 20;

/// Creates a one-way channel of one descriptor pair and returns `(read end, write end)`,
/// both non-blocking and close-on-exec. A forked child inherits them anyway; close-on-exec
/// only keeps them out of programs the application `exec`s. (`Hybrid` makes its frame lane,
/// a pipe; see [`channel_ends`] for both lanes.)
pub fn channel(transport: Transport) -> io::Result<(OwnedFd, OwnedFd)> {
    let (read_end, write_end) = match transport {
        // Not grown here: every page of a pipe counts against the user's budget, shared
        // with every other program of that user (see `growth`).
        Transport::Pipe | Transport::Hybrid => rustix::pipe::pipe()?,
        Transport::Socket => {
            use rustix::net::{socketpair, sockopt, AddressFamily, SocketFlags, SocketType};
            let (r, w) = socketpair(
                AddressFamily::UNIX,
                SocketType::STREAM,
                SocketFlags::empty(),
                None,
            )?;
            // Larger buffers mean fewer wake-ups per megabyte; the kernel clamps what it
            // does not allow, which is fine, so errors are ignored.
            let _ = sockopt::set_socket_send_buffer_size(&w, SOCKET_BUFFER);
            let _ = sockopt::set_socket_recv_buffer_size(&r, SOCKET_BUFFER);
            // The write end is never read from and the read end never written to.
            let _ = rustix::net::shutdown(&r, rustix::net::Shutdown::Write);
            let _ = rustix::net::shutdown(&w, rustix::net::Shutdown::Read);
            #[cfg(target_vendor = "apple")]
            {
                let _ = sockopt::set_socket_nosigpipe(&w, true);
            }
            (r, w)
        }
    };
    for fd in [&read_end, &write_end] {
        set_nonblocking_cloexec(fd.as_fd())?;
    }
    Ok((read_end, write_end))
}

/// Portable (no `pipe2`/`SOCK_CLOEXEC` on macOS): two `fcntl`s at creation time only.
pub fn set_nonblocking_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = fcntl_getfl(fd)?;
    fcntl_setfl(fd, flags | OFlags::NONBLOCK)?;
    fcntl_setfd(fd, FdFlags::CLOEXEC)?;
    Ok(())
}

/// Reads from a descriptor, retrying on `EINTR`.
pub struct FdReader<'a>(pub BorrowedFd<'a>);

impl ReadSource for FdReader<'_> {
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match rustix::io::read(self.0, &mut *buf) {
                Err(rustix::io::Errno::INTR) => continue,
                other => return other.map_err(io::Error::from),
            }
        }
    }
}

/// Writes to a descriptor, retrying on `EINTR`. On a socket it asks the kernel not to raise
/// `SIGPIPE`, so a vanished reader is an `EPIPE` error whatever the signal disposition; a
/// pipe may need more: write to one inside [`crate::sigpipe::without_sigpipe`].
pub struct FdWriter<'a> {
    fd: BorrowedFd<'a>,
    transport: Transport,
}

impl<'a> FdWriter<'a> {
    pub fn new(fd: BorrowedFd<'a>, transport: Transport) -> Self {
        FdWriter { fd, transport }
    }
}

impl WriteSink for FdWriter<'_> {
    fn write_some(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        loop {
            let result = match self.transport {
                Transport::Pipe | Transport::Hybrid => crate::sigpipe::writev_pipe(self.fd, bufs),
                Transport::Socket => send_no_sigpipe(self.fd, bufs, &[]),
            };
            match result {
                Err(rustix::io::Errno::INTR) => continue,
                other => return other.map_err(io::Error::from),
            }
        }
    }

    fn write_with_fds(
        &mut self,
        bufs: &[IoSlice<'_>],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<usize> {
        if self.transport != Transport::Socket {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "descriptors travel only on a socket",
            ));
        }
        loop {
            match send_no_sigpipe(self.fd, bufs, fds) {
                Err(rustix::io::Errno::INTR) => continue,
                other => return other.map_err(io::Error::from),
            }
        }
    }
}

/// Descriptors received on a socket lane (`SCM_RIGHTS`) and not yet handed out with their
/// message, in the order they came, with a mark where the kernel dropped some.
///
/// A writer sends a message's descriptors with the first of its bytes on the socket lane, in
/// one `sendmsg` (see `send::Sender::push_with_fds`), and the kernel ends a `recvmsg` after
/// the bytes that carry descriptors: they come in stream order, one message's at a time,
/// and each `Kind::Handles` message takes from the front as many as its payload says. When
/// the kernel cannot install them all (`MSG_CTRUNC`: the receiving process is at its
/// descriptor limit, `RLIMIT_NOFILE`, or the message had more than the reader has room
/// for), the mark after those that did come tells their message that it lost some, so it
/// fails alone and takes no descriptor of the messages behind it.
#[derive(Debug, Default)]
pub struct ReceivedFds {
    queue: VecDeque<Received>,
}

#[derive(Debug)]
enum Received {
    Fd(OwnedFd),
    /// The descriptors of one message end here, some of them lost.
    Truncated,
}

/// Why a message that carries descriptors cannot have them ([`ReceivedFds::take`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdsError {
    /// The kernel dropped some of them on the way in (`MSG_CTRUNC`).
    Truncated { expected: usize, came: usize },
    /// Fewer came than the message says, with no sign of loss: they were never sent.
    Missing { came: usize },
    /// The message says it carries more than a gipc writer ever sends with one message
    /// ([`MAX_FDS`]): not from a gipc writer. Every descriptor waiting is closed.
    TooMany { count: usize },
}

impl std::fmt::Display for FdsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FdsError::Truncated { expected, came } => write!(
                f,
                "the descriptors of a message carrying gipc handles were lost on the way in: \
                 {came} of its {expected} came, the kernel dropped the rest (MSG_CTRUNC), most \
                 likely because this process is at its limit of open descriptors \
                 (RLIMIT_NOFILE, `ulimit -n`), or the message had more descriptors than this \
                 process could take. The message is dropped (the descriptors that came are \
                 closed); the next message is read normally"
            ),
            FdsError::Missing { came } => write!(
                f,
                "a message that carries descriptors came without them ({came} came): is the \
                 writer a pipe-only channel, or not gipc?"
            ),
            FdsError::TooMany { count } => write!(
                f,
                "a message says it carries {count} descriptors, more than a gipc writer sends \
                 with one message ({MAX_FDS}): is the writer gipc? The descriptors received \
                 and not yet returned are closed"
            ),
        }
    }
}

impl std::error::Error for FdsError {}

impl ReceivedFds {
    pub fn new() -> Self {
        Self::default()
    }

    /// True when nothing is waiting for its message: no descriptor, and no mark of a loss.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// How many descriptors are waiting for their message.
    pub fn len(&self) -> usize {
        self.queue
            .iter()
            .filter(|r| matches!(r, Received::Fd(_)))
            .count()
    }

    /// Closes every descriptor waiting, and forgets the marks.
    pub fn clear(&mut self) {
        self.queue.clear();
    }

    /// The `count` descriptors of the next message that carries some, which the caller now
    /// owns. On an error those of its descriptors that came are closed: a loss the kernel
    /// marked costs that message only; descriptors missing without a mark (never sent)
    /// leave none behind, since none can be matched to a message any more.
    pub fn take(&mut self, count: usize) -> Result<Vec<OwnedFd>, FdsError> {
        if count > MAX_FDS {
            // The count is the peer's word: checked before anything is allocated for it.
            self.clear();
            return Err(FdsError::TooMany { count });
        }
        let mut taken = Vec::with_capacity(count);
        while taken.len() < count {
            match self.queue.pop_front() {
                Some(Received::Fd(fd)) => taken.push(fd),
                // `taken` drops here: the descriptors that came close.
                Some(Received::Truncated) => {
                    return Err(FdsError::Truncated {
                        expected: count,
                        came: taken.len(),
                    })
                }
                None => return Err(FdsError::Missing { came: taken.len() }),
            }
        }
        Ok(taken)
    }

    fn push(&mut self, fd: OwnedFd) {
        self.queue.push_back(Received::Fd(fd));
    }

    fn mark_truncated(&mut self) {
        self.queue.push_back(Received::Truncated);
    }
}

/// Reads from a socket, keeping the descriptors that come with the bytes (`SCM_RIGHTS`),
/// in order, in `received`; they are close-on-exec.
pub struct SocketReader<'a> {
    pub fd: BorrowedFd<'a>,
    pub received: &'a mut ReceivedFds,
}

impl ReadSource for SocketReader<'_> {
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        recv_with_fds(
            self.fd,
            buf,
            self.received,
            &mut space,
            rustix::net::RecvFlags::empty(),
        )
    }
}

/// Sends `data` and `fds` (`SCM_RIGHTS`) on the socket `fd` in one `sendmsg` that never
/// waits (`MSG_DONTWAIT`) nor raises `SIGPIPE`: a *record*, for sockets of gipc's own that
/// are not channels (the fork server's). Returns the bytes sent (a stream socket may take
/// fewer). The descriptors stay the caller's: nothing here owns or closes one, so no
/// exception raised by the caller's code (a signal handler's) can leave one closed behind
/// its owner's back, as a Python socket object made around a bare number could.
pub fn send_record(fd: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendFlags};
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_FDS} descriptors go with one record"),
        ));
    }
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    let flags = SendFlags::DONTWAIT; // SO_NOSIGPIPE is the socket's own there
    let mut space = rights_space();
    let mut none = SendAncillaryBuffer::default();
    let control = if fds.is_empty() {
        &mut none
    } else {
        &mut rights(fds, &mut space)
    };
    loop {
        match sendmsg(fd, &[IoSlice::new(data)], control, flags) {
            Err(rustix::io::Errno::INTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

/// One `recvmsg` that never waits (`MSG_DONTWAIT`) of at most `buf.len()` bytes from the
/// socket `fd`, and the descriptors that came with them (close-on-exec; more than
/// [`MAX_FDS`] are dropped by the kernel): a record ([`send_record`]). `(0, [])` at the
/// end of the stream; `WouldBlock` when nothing is there.
pub fn recv_record(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    recv_record_noting_loss(fd, buf).map(|(n, fds, _lost)| (n, fds))
}

/// [`recv_record`], and whether the kernel dropped descriptors that came with the bytes
/// (`MSG_CTRUNC`: this process at its limit of open descriptors, or more than
/// [`MAX_FDS`]).
pub fn recv_record_noting_loss(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    let mut received = ReceivedFds::new();
    let mut space = rights_space();
    let n = recv_with_fds(
        fd,
        buf,
        &mut received,
        &mut space,
        rustix::net::RecvFlags::DONTWAIT,
    )?;
    let mut lost = false;
    let fds = received
        .queue
        .into_iter()
        .filter_map(|r| match r {
            Received::Fd(fd) => Some(fd),
            Received::Truncated => {
                lost = true;
                None
            }
        })
        .collect();
    Ok((n, fds, lost))
}

/// One `recvmsg` from `fd` into `buf`, with `space` for the control message (room for
/// [`MAX_FDS`] descriptors in [`SocketReader`]; less in tests, to make the kernel drop
/// some). The descriptors that come go into `received`.
///
/// When the kernel could not deliver them all (`MSG_CTRUNC`), the bytes read are still
/// returned: they are the stream's, and dropping them would put every later frame out of
/// step (on a hybrid channel, a bulk-lane payload would be filled from the next one's
/// bytes, and the reader would wait for ever). The loss is marked in `received` for the
/// message those bytes begin, which then fails on its own (see [`ReceivedFds::take`]).
fn recv_with_fds(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    received: &mut ReceivedFds,
    space: &mut [std::mem::MaybeUninit<u8>],
    extra_flags: rustix::net::RecvFlags,
) -> io::Result<usize> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut control = RecvAncillaryBuffer::new(space);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    let flags = RecvFlags::CMSG_CLOEXEC | extra_flags;
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    let flags = extra_flags;
    let message = loop {
        match recvmsg(fd, &mut [io::IoSliceMut::new(buf)], &mut control, flags) {
            Err(rustix::io::Errno::INTR) => continue,
            other => break other.map_err(io::Error::from)?,
        }
    };
    for cmsg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = cmsg {
            for fd in fds {
                #[cfg(not(any(
                    target_os = "linux",
                    target_os = "android",
                    target_os = "freebsd"
                )))]
                let _ = rustix::io::fcntl_setfd(&fd, FdFlags::CLOEXEC);
                received.push(fd);
            }
        }
    }
    if message.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        received.mark_truncated();
    }
    Ok(message.bytes)
}

#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn send_no_sigpipe(
    fd: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> rustix::io::Result<usize> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendFlags};
    if fds.is_empty() {
        return sendmsg(
            fd,
            bufs,
            &mut SendAncillaryBuffer::default(),
            SendFlags::NOSIGNAL,
        );
    }
    sendmsg(
        fd,
        bufs,
        &mut rights(fds, &mut rights_space()),
        SendFlags::NOSIGNAL,
    )
}

type RightsSpace = [std::mem::MaybeUninit<u8>; rustix::cmsg_space!(ScmRights(MAX_FDS))];

fn rights_space() -> RightsSpace {
    [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))]
}

/// An ancillary buffer that passes `fds`.
fn rights<'buf, 'slice, 'fd>(
    fds: &'slice [BorrowedFd<'fd>],
    space: &'buf mut RightsSpace,
) -> rustix::net::SendAncillaryBuffer<'buf, 'slice, 'fd> {
    let mut control = rustix::net::SendAncillaryBuffer::new(space);
    let fit = control.push(rustix::net::SendAncillaryMessage::ScmRights(fds));
    assert!(
        fit,
        "at most MAX_FDS descriptors per frame (checked when queued)"
    );
    control
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
fn send_no_sigpipe(
    fd: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> rustix::io::Result<usize> {
    // SO_NOSIGPIPE was set on the socket when the channel was made.
    if fds.is_empty() {
        return rustix::io::writev(fd, bufs);
    }
    rustix::net::sendmsg(
        fd,
        bufs,
        &mut rights(fds, &mut rights_space()),
        rustix::net::SendFlags::empty(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(transport: Transport) {
        let (r, w) = channel(transport).unwrap();
        let mut writer = FdWriter::new(w.as_fd(), transport);
        let n = writer
            .write_some(&[IoSlice::new(b"head"), IoSlice::new(b"-tail")])
            .unwrap();
        assert_eq!(n, 9);
        let mut buf = [0u8; 16];
        let n = FdReader(r.as_fd()).read_some(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"head-tail");
        // Nothing more: a non-blocking read says so instead of waiting.
        let err = FdReader(r.as_fd()).read_some(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(w);
        assert_eq!(FdReader(r.as_fd()).read_some(&mut buf).unwrap(), 0);
    }

    #[test]
    fn an_end_has_input_when_either_lane_has_bytes_or_its_writer_is_gone() {
        for transport in [Transport::Pipe, Transport::Socket, Transport::Hybrid] {
            let (r, w) = channel_ends(transport).unwrap();
            assert!(!r.has_input_now(), "{transport:?}: empty");
            let mut buf = [0u8; 8];
            for lane in [Lane::Frame, Lane::Bulk] {
                FdWriter::new(w.lane(lane), transport.frame_lane())
                    .write_some(&[IoSlice::new(b"x")])
                    .unwrap();
                assert!(r.has_input_now(), "{transport:?}: a byte on {lane:?}");
                FdReader(r.lane(lane)).read_some(&mut buf).unwrap();
                assert!(!r.has_input_now(), "{transport:?}: read again");
            }
            drop(w);
            assert!(r.has_input_now(), "{transport:?}: the end of the stream");
        }
    }

    #[test]
    fn pipe_carries_bytes_and_reports_eof() {
        round_trip(Transport::Pipe);
    }

    #[test]
    fn socket_carries_bytes_and_reports_eof() {
        round_trip(Transport::Socket);
    }

    #[test]
    fn a_hybrid_channel_has_a_pipe_and_a_socket_lane() {
        let (r, w) = channel_ends(Transport::Hybrid).unwrap();
        let is_socket = |fd: &OwnedFd| rustix::net::sockopt::socket_type(fd).is_ok();
        assert!(!is_socket(&r.frame) && !is_socket(&w.frame));
        let (rb, wb) = (r.bulk.unwrap(), w.bulk.unwrap());
        assert!(is_socket(&rb) && is_socket(&wb));
        for fd in [&r.frame, &w.frame, &rb, &wb] {
            assert!(fcntl_getfl(fd).unwrap().contains(OFlags::NONBLOCK));
        }
        let (r, w) = channel_ends(Transport::Socket).unwrap();
        assert!(r.bulk.is_none() && w.bulk.is_none());
    }

    #[test]
    fn channel_ends_are_nonblocking_and_cloexec() {
        for transport in [Transport::Pipe, Transport::Socket] {
            let (r, w) = channel(transport).unwrap();
            for fd in [&r, &w] {
                assert!(fcntl_getfl(fd).unwrap().contains(OFlags::NONBLOCK));
                assert!(rustix::io::fcntl_getfd(fd)
                    .unwrap()
                    .contains(FdFlags::CLOEXEC));
            }
        }
    }

    #[test]
    fn writing_without_a_reader_is_a_broken_pipe_not_a_signal() {
        for transport in [Transport::Pipe, Transport::Socket] {
            let (r, w) = channel(transport).unwrap();
            drop(r);
            // The Rust test harness ignores SIGPIPE for pipes, as CPython does.
            let err = FdWriter::new(w.as_fd(), transport)
                .write_some(&[IoSlice::new(b"x")])
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        }
    }

    fn borrow(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
        fds.iter().map(|fd| fd.as_fd()).collect()
    }

    #[test]
    fn check_end_accepts_each_transports_own_ends_and_refuses_others() {
        for transport in [Transport::Pipe, Transport::Socket, Transport::Hybrid] {
            let (r, w) = channel_ends(transport).unwrap();
            let fds = |end: &End| -> Vec<OwnedFd> {
                std::iter::once(&end.frame)
                    .chain(&end.bulk)
                    .map(|fd| fd.try_clone().unwrap())
                    .collect()
            };
            let (rfds, wfds) = (fds(&r), fds(&w));
            let (rfds, wfds) = (borrow(&rfds), borrow(&wfds));
            check_end(transport, &rfds, true).unwrap();
            check_end(transport, &wfds, false).unwrap();
            assert!(matches!(
                check_end(transport, &rfds[..1.min(rfds.len() - 1)], true),
                Err(EndError::Count { .. })
            ));
        }
        let (pr, pw) = channel(Transport::Pipe).unwrap();
        let (sr, _sw) = channel(Transport::Socket).unwrap();
        // A pipe's write end is not a read end, and the lanes must be what they are.
        let err = check_end(Transport::Pipe, &[pw.as_fd()], true).unwrap_err();
        assert!(err.to_string().contains("read end"), "{err}");
        assert!(check_end(Transport::Pipe, &[pr.as_fd()], false).is_err());
        let err = check_end(Transport::Socket, &[pr.as_fd()], true).unwrap_err();
        assert!(err.to_string().contains("AF_UNIX"), "{err}");
        let err = check_end(Transport::Pipe, &[sr.as_fd()], true).unwrap_err();
        assert!(err.to_string().contains("a pipe"), "{err}");
        let err = check_end(Transport::Hybrid, &[pr.as_fd(), pr.as_fd()], true).unwrap_err();
        assert!(err.to_string().contains("same"), "{err}");
        let err = check_end(Transport::Hybrid, &[pr.as_fd(), pw.as_fd()], true).unwrap_err();
        assert!(err.to_string().contains("AF_UNIX"), "{err}");
        // An AF_INET stream socket is not an AF_UNIX one.
        let inet = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(check_end(Transport::Socket, &[inet.as_fd()], true).is_err());
    }

    #[test]
    fn descriptors_cross_a_real_channel_with_their_message() {
        use crate::budget::Budget;
        use crate::frame::Kind;
        use crate::recv::{Event, Payload, Receiver};
        use crate::send::Sender;
        for transport in [Transport::Socket, Transport::Hybrid] {
            let (r, w) = channel_ends(transport).unwrap();
            let mut tx = match w.bulk {
                Some(_) => Sender::with_bulk_lane(Budget::new(None), BULK_MIN),
                None => Sender::new(Budget::new(None)),
            };
            let (pr, pw) = channel(Transport::Pipe).unwrap();
            tx.push(Kind::Encoded, b"plain".to_vec()).unwrap();
            let fds = vec![pr.try_clone().unwrap(), pw.try_clone().unwrap()];
            tx.push_with_fds(Kind::Handles, b"\x02\0\0\0fds".to_vec(), fds)
                .unwrap();
            let frame_lane = transport.frame_lane();
            let mut sink = FdWriter::new(w.frame.as_fd(), frame_lane);
            let mut bulk_sink = w
                .bulk
                .as_ref()
                .map(|b| FdWriter::new(b.as_fd(), Transport::Socket));
            let progress = tx.flush_lanes(&mut sink, bulk_sink.as_mut()).unwrap();
            assert_eq!(progress, crate::send::Progress::Done);

            let mut received = ReceivedFds::new();
            let mut rx: Receiver<Vec<u8>> = Receiver::new(u64::MAX, Budget::new(None));
            let mut messages = Vec::new();
            for _ in 0..10 {
                let event = match &r.bulk {
                    None => rx.poll_lanes(
                        &mut SocketReader {
                            fd: r.frame.as_fd(),
                            received: &mut received,
                        },
                        None::<&mut FdReader<'_>>,
                        |n| Some(vec![0; n]),
                    ),
                    Some(bulk) => rx.poll_lanes(
                        &mut FdReader(r.frame.as_fd()),
                        Some(&mut SocketReader {
                            fd: bulk.as_fd(),
                            received: &mut received,
                        }),
                        |n| Some(vec![0; n]),
                    ),
                };
                if let Event::Message { kind, payload } = event.unwrap() {
                    let data = match payload {
                        Payload::Buffered(b) => b.to_vec(),
                        Payload::Owned(v) => v,
                    };
                    messages.push((kind, data, received.len()));
                }
            }
            assert_eq!(messages.len(), 2, "{transport:?}");
            assert_eq!(messages[1].0, Kind::Handles);
            assert_eq!(
                messages[1].2, 2,
                "both descriptors are in by the end of their frame"
            );
            // They are new descriptors for the same pipe, close-on-exec.
            let mut fds = received.take(2).unwrap().into_iter();
            let (got_r, got_w) = (fds.next().unwrap(), fds.next().unwrap());
            assert!(received.is_empty());
            assert!(rustix::io::fcntl_getfd(&got_r)
                .unwrap()
                .contains(FdFlags::CLOEXEC));
            rustix::io::write(&got_w, b"!").unwrap();
            let mut buf = [0u8; 1];
            assert_eq!(rustix::io::read(&pr, &mut buf).unwrap(), 1);
        }
    }

    /// Control space for one descriptor (two, once aligned, on 64-bit Linux): less than the
    /// tests below send with one message, so the kernel drops the rest and says so
    /// (`MSG_CTRUNC`), as it does for a receiver at its descriptor limit (`RLIMIT_NOFILE`).
    type TightSpace = [std::mem::MaybeUninit<u8>; rustix::cmsg_space!(ScmRights(1))];

    fn tight_space() -> TightSpace {
        [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))]
    }

    /// A socket lane read as [`SocketReader`] does, with [`tight_space`].
    struct TightSocketReader<'a> {
        fd: BorrowedFd<'a>,
        received: &'a mut ReceivedFds,
    }

    impl ReadSource for TightSocketReader<'_> {
        fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            recv_with_fds(
                self.fd,
                buf,
                self.received,
                &mut tight_space(),
                rustix::net::RecvFlags::empty(),
            )
        }
    }

    /// `n` copies of `fd`.
    fn copies(fd: &OwnedFd, n: usize) -> Vec<OwnedFd> {
        (0..n).map(|_| fd.try_clone().unwrap()).collect()
    }

    /// True when no copy of `write_end` is open anywhere (none leaked): its pipe's read end
    /// `read_end`, non-blocking, is at end of stream.
    fn all_closed(read_end: &OwnedFd) -> bool {
        matches!(rustix::io::read(read_end, &mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn a_truncated_control_message_keeps_its_bytes_and_marks_the_loss() {
        let (r, w) = channel(Transport::Socket).unwrap();
        let (pr, pw) = channel(Transport::Pipe).unwrap();
        let (qr, qw) = channel(Transport::Pipe).unwrap();
        let mut writer = FdWriter::new(w.as_fd(), Transport::Socket);
        writer.write_some(&[IoSlice::new(b"before|")]).unwrap();
        let lost = copies(&pw, 5);
        writer
            .write_with_fds(&[IoSlice::new(b"lost|")], &borrow(&lost))
            .unwrap();
        let kept = copies(&qw, 1);
        writer
            .write_with_fds(&[IoSlice::new(b"kept")], &borrow(&kept))
            .unwrap();
        drop((lost, kept, pw, qw));

        let mut received = ReceivedFds::new();
        let (mut bytes, mut buf) = (Vec::new(), [0u8; 64]);
        loop {
            match recv_with_fds(
                r.as_fd(),
                &mut buf,
                &mut received,
                &mut tight_space(),
                rustix::net::RecvFlags::empty(),
            ) {
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) => panic!("{err}"),
            }
        }
        // Every byte, those read with the truncated control message too: the stream is
        // in step.
        assert_eq!(bytes, b"before|lost|kept");
        let came = received.len() - 1; // the last message's one came whole
        assert!(
            came < 5,
            "the kernel dropped none of 5 descriptors: {came} came"
        );
        match received.take(5) {
            Err(err @ FdsError::Truncated { expected: 5, .. }) => {
                assert_eq!(err, FdsError::Truncated { expected: 5, came });
                assert!(err.to_string().contains("RLIMIT_NOFILE"), "{err}");
            }
            other => panic!("{other:?}"),
        }
        // Those that came are closed: no copy of the write end is left.
        assert!(all_closed(&pr));
        // The next message's descriptor is its own, and works.
        let next = received.take(1).unwrap();
        assert!(received.is_empty());
        rustix::io::write(&next[0], b"!").unwrap();
        assert_eq!(rustix::io::read(&qr, &mut buf).unwrap(), 1);
    }

    #[test]
    fn a_count_above_what_a_writer_sends_is_refused_before_any_allocation() {
        // The count comes from the peer: u32::MAX descriptors would be a 16 GiB vector.
        let (r, w) = rustix::pipe::pipe().unwrap();
        let mut received = ReceivedFds::new();
        received.push(w);
        match received.take(u32::MAX as usize) {
            Err(err @ FdsError::TooMany { count }) => {
                assert_eq!(count, u32::MAX as usize);
                assert!(
                    err.to_string().contains("more than a gipc writer sends"),
                    "{err}"
                );
            }
            other => panic!("{other:?}"),
        }
        // What was waiting is closed: no message can be matched with it any more.
        assert!(received.is_empty());
        let mut buf = [0u8; 1];
        assert_eq!(
            rustix::io::read(&r, &mut buf).unwrap(),
            0,
            "the write end is closed"
        );
        assert_eq!(received.take(0).unwrap().len(), 0);
        received.push(rustix::pipe::pipe().unwrap().1);
        assert_eq!(
            received.take(MAX_FDS).unwrap_err(),
            FdsError::Missing { came: 1 }
        );
    }

    #[test]
    fn a_message_whose_descriptors_were_dropped_fails_alone_and_the_rest_arrive() {
        use crate::budget::Budget;
        use crate::frame::Kind;
        use crate::recv::{Event, Payload, Receiver};
        use crate::send::{Progress, Sender};
        for transport in [Transport::Socket, Transport::Hybrid] {
            let (r, w) = channel_ends(transport).unwrap();
            let mut tx = match w.bulk {
                Some(_) => Sender::with_bulk_lane(Budget::new(None), BULK_MIN),
                None => Sender::new(Budget::new(None)),
            };
            let (pr, pw) = channel(Transport::Pipe).unwrap();
            let (qr, qw) = channel(Transport::Pipe).unwrap();
            let large = vec![7u8; 100_000]; // the bulk lane's, on a hybrid channel
            tx.push(Kind::Encoded, b"before".to_vec()).unwrap();
            tx.push_with_fds(Kind::Handles, b"\x05\0\0\0lost".to_vec(), copies(&pw, 5))
                .unwrap();
            tx.push(Kind::Encoded, b"small".to_vec()).unwrap();
            tx.push(Kind::Bytes, large.clone()).unwrap();
            tx.push_with_fds(Kind::Handles, b"\x01\0\0\0kept".to_vec(), copies(&qw, 1))
                .unwrap();
            tx.push(Kind::Encoded, b"last".to_vec()).unwrap();
            let mut sink = FdWriter::new(w.frame.as_fd(), transport.frame_lane());
            let mut bulk_sink = w
                .bulk
                .as_ref()
                .map(|b| FdWriter::new(b.as_fd(), Transport::Socket));
            let progress = tx.flush_lanes(&mut sink, bulk_sink.as_mut()).unwrap();
            assert_eq!(progress, Progress::Done);
            drop((pw, qw));

            // Each message as the extension hands it out: a `Handles` one takes its
            // descriptors the moment it is complete.
            let mut received = ReceivedFds::new();
            let mut rx: Receiver<Vec<u8>> = Receiver::new(u64::MAX, Budget::new(None));
            let mut messages = Vec::new();
            for _ in 0..50 {
                let event = match &r.bulk {
                    None => rx.poll_lanes(
                        &mut TightSocketReader {
                            fd: r.frame.as_fd(),
                            received: &mut received,
                        },
                        None::<&mut FdReader<'_>>,
                        |n| Some(vec![0; n]),
                    ),
                    Some(bulk) => rx.poll_lanes(
                        &mut FdReader(r.frame.as_fd()),
                        Some(&mut TightSocketReader {
                            fd: bulk.as_fd(),
                            received: &mut received,
                        }),
                        |n| Some(vec![0; n]),
                    ),
                };
                if let Event::Message { kind, payload } = event.unwrap() {
                    let data = match payload {
                        Payload::Buffered(b) => b.to_vec(),
                        Payload::Owned(v) => v,
                    };
                    let fds = (kind == Kind::Handles).then(|| {
                        let count = u32::from_le_bytes(data[..4].try_into().unwrap());
                        received.take(count as usize)
                    });
                    messages.push((kind, data, fds));
                }
            }
            let texts: Vec<&[u8]> = messages.iter().map(|m| &m.1[..]).collect();
            assert_eq!(
                texts,
                [
                    &b"before"[..],
                    b"\x05\0\0\0lost",
                    b"small",
                    &large,
                    b"\x01\0\0\0kept",
                    b"last"
                ],
                "{transport:?}"
            );
            assert!(
                matches!(
                    messages[1].2,
                    Some(Err(FdsError::Truncated { expected: 5, came })) if came < 5
                ),
                "{transport:?}: {:?}",
                messages[1].2
            );
            assert!(
                all_closed(&pr),
                "{transport:?}: a dropped message's descriptor leaked"
            );
            let Some(Ok(kept)) = &messages[4].2 else {
                panic!("{transport:?}: {:?}", messages[4].2)
            };
            assert_eq!(kept.len(), 1);
            rustix::io::write(&kept[0], b"!").unwrap();
            assert_eq!(rustix::io::read(&qr, &mut [0u8; 1]).unwrap(), 1);
            assert!(received.is_empty(), "{transport:?}");
        }
    }

    #[test]
    fn each_message_takes_its_own_descriptors_even_after_a_loss() {
        let fd = || channel(Transport::Pipe).unwrap().0;
        let mut received = ReceivedFds::new();
        // Three messages' descriptors in before any message is taken: 2 that came whole,
        // 1 of 3 (the kernel dropped 2), then 1.
        received.push(fd());
        received.push(fd());
        received.push(fd());
        received.mark_truncated();
        received.push(fd());
        assert_eq!(received.len(), 4);
        // A message without descriptors takes nothing, not even a mark.
        assert!(received.take(0).unwrap().is_empty());
        assert_eq!(received.take(2).unwrap().len(), 2);
        assert_eq!(
            received.take(3).unwrap_err(),
            FdsError::Truncated {
                expected: 3,
                came: 1
            }
        );
        assert_eq!(received.take(1).unwrap().len(), 1);
        assert!(received.is_empty());
        // None of a message's descriptors could be installed: the mark alone.
        received.mark_truncated();
        assert!(!received.is_empty());
        assert_eq!(
            received.take(4).unwrap_err(),
            FdsError::Truncated {
                expected: 4,
                came: 0
            }
        );
        // Fewer than announced and no mark: never sent; none is left to a later message.
        received.push(fd());
        let err = received.take(2).unwrap_err();
        assert_eq!(err, FdsError::Missing { came: 1 });
        assert!(
            err.to_string().contains("came without them (1 came)"),
            "{err}"
        );
        assert!(received.is_empty());
    }

    /// A connected pair of blocking stream sockets: the record calls must not wait anyway.
    fn stream_pair() -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap()
    }

    #[test]
    fn a_record_carries_its_bytes_and_descriptors_and_leaves_every_end_open() {
        let (a, b) = stream_pair();
        let (p, _q) = rustix::pipe::pipe().unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            recv_record(b.as_fd(), &mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "a blocking socket with nothing in it: the call does not wait"
        );
        assert_eq!(send_record(a.as_fd(), b"pid 42", &[p.as_fd()]).unwrap(), 6);
        let (n, fds) = recv_record(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"pid 42");
        assert_eq!(fds.len(), 1);
        assert_ne!(
            fds[0].as_raw_fd(),
            p.as_raw_fd(),
            "a new descriptor, the caller's"
        );
        let flags = rustix::io::fcntl_getfd(&fds[0]).unwrap();
        assert!(flags.contains(FdFlags::CLOEXEC));
        // The sockets and the descriptor passed are still open: nothing here closed them.
        for fd in [&a, &b, &p] {
            rustix::fs::fstat(fd).unwrap();
        }
        assert_eq!(send_record(a.as_fd(), b"x", &[]).unwrap(), 1);
        let (n, fds) = recv_record(b.as_fd(), &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"x"[..], 0));
        drop(a);
        assert_eq!(
            recv_record(b.as_fd(), &mut buf).unwrap().0,
            0,
            "the end of the stream"
        );
    }

    #[test]
    fn a_record_to_a_closed_peer_is_broken_pipe_without_a_signal() {
        // Under `cargo test` SIGPIPE is at its default action: a signal would kill the test.
        let (a, b) = stream_pair();
        drop(b);
        let err = send_record(a.as_fd(), b"s", &[]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn a_record_with_too_many_descriptors_is_refused_before_sending() {
        let (a, b) = stream_pair();
        let (p, _q) = rustix::pipe::pipe().unwrap();
        let many = vec![p.as_fd(); MAX_FDS + 1];
        let err = send_record(a.as_fd(), b"s", &many).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let mut buf = [0u8; 8];
        assert_eq!(
            recv_record(b.as_fd(), &mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "nothing was sent"
        );
    }

    #[test]
    fn transport_names() {
        assert_eq!(Transport::from_name("pipe"), Some(Transport::Pipe));
        assert_eq!(Transport::from_name("socket"), Some(Transport::Socket));
        assert_eq!(Transport::from_name("hybrid"), Some(Transport::Hybrid));
        assert_eq!(Transport::from_name("carrier-pigeon"), None);
        for transport in [Transport::Pipe, Transport::Socket, Transport::Hybrid] {
            assert_eq!(Transport::from_name(transport.name()), Some(transport));
        }
    }
}
