//! Reading the rest of a large payload on a thread of its own, "aside" from the event loop.
//!
//! Filling a fresh 64 MiB buffer faults in every one of its pages as the kernel copies into
//! it. On a virtual machine with free page reporting, a huge page whose block the host took
//! back costs 3-7 ms to fault in (see `memory`), inside one `read`: on the event loop's
//! thread, every other greenlet and I/O event waits that long, several times per message.
//! Here the loop's thread hands the payload's remaining bytes to a thread, waits through the
//! hub for one descriptor (an eventfd) like for any other, and takes the buffer once the
//! thread is done. The faults and the copy cost the same; they no longer stop the loop.
//!
//! What keeps that safe:
//! - The thread writes only `buf[filled..len]`, which nothing else reads or writes until the
//!   thread is joined ([`AsideRead`]'s owner keeps its hands off the buffer meanwhile).
//! - It reads at most the payload's remaining bytes from the source, never the next frame.
//! - The source descriptor, the eventfd and the buffer outlive the thread: dropping an
//!   [`AsideRead`] stops and joins it, and its owner drops it before any of them.
//! - The thread takes no lock (a fork while it runs leaves none held in the child), blocks
//!   every signal (they go to the program's own threads, as before), and waits only in
//!   `poll`, on the source and on the eventfd (readable: stop).
//! - In a forked child the thread does not exist: the copy is forgotten, never joined nor
//!   signalled (the eventfd is shared with the parent's).
//! - A read with descriptors attached (`SCM_RIGHTS`) does not belong here: the owner keeps
//!   messages that carry them on its own thread.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::budget::now_ns;
use crate::io::MAX_IO_CHUNK;
use crate::memory::HugePages;

/// Remaining payloads at least this long are read aside: below it a thread's start (tens of
/// microseconds) and the wake-up through the hub are a larger share, and the buffer gets no
/// huge pages (`memory::HUGE_PAGE_HINT_MIN`), whose faults are the slow ones.
pub const ASIDE_MIN: usize = crate::memory::HUGE_PAGE_HINT_MIN;

/// The thread's stack: it calls `read`, `poll` and `write`, nothing deep.
const STACK: usize = 64 << 10;

/// How the thread's reading ended.
#[derive(Debug)]
pub enum End {
    /// Every byte of the payload is in the buffer.
    Complete,
    /// The source reached end of stream first (the writer closed or died mid-message).
    Eof,
    /// Stopped on request ([`AsideRead::stop`]); the rest is still to read.
    Halted,
    /// The thread is not in this process: it was forked while the thread read. Bytes it read
    /// after its last report are in the parent's copy only, so the stream cannot go on here.
    Lost,
    /// A read or poll failed.
    Failed(io::Error),
}

/// What an [`AsideRead`] leaves when it is done: how far the buffer is filled now, the
/// huge-page state to go on with, and why it stopped.
#[derive(Debug)]
pub struct Finished {
    pub filled: usize,
    pub pages: Option<HugePages>,
    pub end: End,
}

/// Where the thread writes: the buffer's start. Sent to the thread, which uses it only for
/// the part of the buffer that is its own (see the module's documentation).
struct BufStart(*mut u8);

// SAFETY: the pointer is used by one thread at a time: the reading thread until it is
// joined, the owner after (see the module's documentation).
unsafe impl Send for BufStart {}

/// What the thread and its owner share besides the buffer: the stop request (also signalled
/// on the eventfd, to wake a `poll`), the progress, for [`AsideRead::filled`], and whether
/// the thread is done with the buffer (set before it signals the eventfd, so that whoever
/// the eventfd wakes finds it set: the thread's own exit comes some microseconds later).
struct Shared {
    stop: AtomicBool,
    filled: AtomicUsize,
    done: AtomicBool,
}

/// A thread reading the rest of one payload. Drop stops and joins it (or, in a forked
/// child, forgets it).
pub struct AsideRead {
    thread: Option<JoinHandle<Finished>>,
    /// What a stopped thread left, until [`AsideRead::finish`] hands it over.
    result: Option<Finished>,
    shared: Arc<Shared>,
    /// Readable once the thread is done; written by the owner to stop it.
    event: OwnedFd,
    /// The process that started the thread, the only one it runs in: its pid, and how
    /// many forks this memory had been through then (see [`in_owner`](AsideRead::in_owner)).
    owner: rustix::process::Pid,
    generation: u64,
}

/// Forks this memory has been through: bumped in every child (`pthread_atfork`).
static FORKS: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_fork_in_child() {
    FORKS.fetch_add(1, Ordering::Relaxed);
}

/// Registers [`count_fork_in_child`] once per process (children inherit the registration).
fn count_forks() {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a function that only bumps an atomic, safe after fork().
    REGISTERED.call_once(|| unsafe {
        libc::pthread_atfork(None, None, Some(count_fork_in_child));
    });
}

impl AsideRead {
    /// Starts reading `buf[filled..len]` from `src` on a new thread. `pages`, the buffer's
    /// huge-page state, travels with it and comes back in [`Finished`].
    ///
    /// # Safety
    /// `buf` must point to `len` writable bytes that stay allocated, and that nothing else
    /// reads or writes from `filled` on, until this `AsideRead` is finished or dropped; `src`
    /// must stay open until then.
    pub unsafe fn start(
        src: BorrowedFd<'_>,
        buf: *mut u8,
        len: usize,
        filled: usize,
        pages: Option<HugePages>,
    ) -> io::Result<AsideRead> {
        count_forks();
        let event = new_event()?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            filled: AtomicUsize::new(filled),
            done: AtomicBool::new(false),
        });
        let job = Job {
            cpu: current_cpu(),
            src: src.as_raw_fd(),
            event: event.as_raw_fd(),
            buf: BufStart(buf),
            len,
            filled,
            pages,
            shared: Arc::clone(&shared),
        };
        // Every signal blocked from the thread's first instruction on: it inherits the mask
        // in force here, for the few microseconds of the spawn (a signal for this process
        // meanwhile waits, pending, and is then handled as ever).
        let mask = BlockedSignals::here();
        let thread = std::thread::Builder::new()
            .name("gipc-read-aside".into())
            .stack_size(STACK)
            .spawn(move || job.run());
        drop(mask);
        Ok(AsideRead {
            thread: Some(thread?),
            result: None,
            shared,
            event,
            owner: rustix::process::getpid(),
            generation: FORKS.load(Ordering::Relaxed),
        })
    }

    /// The descriptor to wait for (readable) until the thread is done.
    pub fn event_fd(&self) -> BorrowedFd<'_> {
        self.event.as_fd()
    }

    /// Whether the thread is done with the buffer (then [`AsideRead::finish`] waits only
    /// for it to return, at most microseconds).
    pub fn is_done(&self) -> bool {
        self.thread.is_none()
            || self.shared.done.load(Ordering::Acquire)
            // A forked copy: the thread will never report here.
            || !self.in_owner()
    }

    /// Whether this is the process that started the thread, not a forked copy of it. The
    /// fork count tells even where a pid could repeat (a pid namespace, a reused pid).
    fn in_owner(&self) -> bool {
        FORKS.load(Ordering::Relaxed) == self.generation && rustix::process::getpid() == self.owner
    }

    /// Asks the thread to stop after the read it is in, and joins it; what it left is kept
    /// for [`AsideRead::finish`]. The eventfd stays open (and readable): a greenlet waiting
    /// on it wakes, and its next poll collects.
    pub fn stop(&mut self) {
        if self.thread.is_some() {
            self.ask_to_stop();
            self.result = Some(self.join());
        }
    }

    /// Bytes of the buffer filled so far (the thread's last report).
    pub fn filled(&self) -> usize {
        self.shared.filled.load(Ordering::Acquire)
    }

    /// Joins the thread (waiting for it if it is not done) and returns what it left.
    pub fn finish(mut self) -> Finished {
        match self.result.take() {
            Some(result) => result,
            None => self.join(),
        }
    }

    fn ask_to_stop(&self) {
        if !self.in_owner() {
            // A forked copy: the eventfd is shared with the parent, whose thread it would
            // wake (and whose waiting greenlet) for nothing.
            return;
        }
        self.shared.stop.store(true, Ordering::Release);
        // A failure (the counter full) would mean it is readable already: the thread sees it.
        let _ = rustix::io::write(&self.event, &1u64.to_ne_bytes());
    }

    /// What the thread left; [`End::Lost`] if there is no thread to join here (a forked
    /// copy, or joined before).
    fn join(&mut self) -> Finished {
        let lost = |filled| Finished {
            filled,
            pages: None,
            end: End::Lost,
        };
        let Some(thread) = self.thread.take() else {
            return lost(self.filled());
        };
        if !self.in_owner() {
            // A forked child: the thread exists only in the parent. Its handle is not ours
            // to join or release.
            std::mem::forget(thread);
            return lost(self.filled());
        }
        match thread.join() {
            Ok(finished) => finished,
            Err(_) => Finished {
                filled: self.filled(),
                pages: None,
                end: End::Failed(io::Error::other("the reading thread panicked")),
            },
        }
    }
}

impl Drop for AsideRead {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.ask_to_stop();
            self.join();
        }
    }
}

impl std::fmt::Debug for AsideRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsideRead")
            .field("filled", &self.filled())
            .field("done", &self.is_done())
            .finish()
    }
}

#[cfg(target_os = "linux")]
fn new_event() -> io::Result<OwnedFd> {
    use rustix::event::{eventfd, EventfdFlags};
    Ok(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?)
}

#[cfg(not(target_os = "linux"))]
fn new_event() -> io::Result<OwnedFd> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "reading aside needs an eventfd (Linux)",
    ))
}

/// The thread's side.
struct Job {
    /// The CPU its owner ran on when it started the thread (see [`stay_on`]).
    cpu: Option<usize>,
    src: RawFd,
    event: RawFd,
    buf: BufStart,
    len: usize,
    filled: usize,
    pages: Option<HugePages>,
    shared: Arc<Shared>,
}

impl Job {
    fn run(mut self) -> Finished {
        // Every signal is blocked already: the thread took the mask `start` set for it.
        stay_on(self.cpu);
        let end = self.read_all();
        let finished = Finished {
            filled: self.filled,
            pages: self.pages.take(),
            end,
        };
        self.shared.done.store(true, Ordering::Release);
        // SAFETY: the owner keeps the eventfd open until it has joined this thread.
        let event = unsafe { BorrowedFd::borrow_raw(self.event) };
        let _ = rustix::io::write(event, &1u64.to_ne_bytes());
        finished
    }

    fn read_all(&mut self) -> End {
        // SAFETY: both stay open until the owner has joined this thread (`AsideRead::start`).
        let (src, event) = unsafe {
            (
                BorrowedFd::borrow_raw(self.src),
                BorrowedFd::borrow_raw(self.event),
            )
        };
        // SAFETY: `start`'s contract: `len` bytes, and from `filled` on they are this
        // thread's alone until it is joined. Nothing before `filled` is touched (the huge-
        // page state only looks at addresses).
        let buf = unsafe { std::slice::from_raw_parts_mut(self.buf.0, self.len) };
        loop {
            if self.filled == self.len {
                return End::Complete;
            }
            if self.shared.stop.load(Ordering::Acquire) {
                return End::Halted;
            }
            let until = self.len.min(self.filled + MAX_IO_CHUNK);
            let started = self
                .pages
                .as_ref()
                .filter(|pages| pages.advised())
                .map(|_| now_ns());
            match rustix::io::read(src, &mut buf[self.filled..until]) {
                Ok(0) => return End::Eof,
                Ok(n) => {
                    if let (Some(pages), Some(started)) = (&mut self.pages, started) {
                        let took = std::time::Duration::from_nanos(now_ns() - started);
                        pages.after_read(buf, self.filled, n, took);
                    }
                    self.filled += n;
                    self.shared.filled.store(self.filled, Ordering::Release);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => {
                    if let Err(err) = wait_for_either(src, event) {
                        return End::Failed(err);
                    }
                }
                Err(err) => return End::Failed(err.into()),
            }
        }
    }
}

/// Waits until `src` is readable (or closed by the writer) or `event` is (a stop request).
fn wait_for_either(src: BorrowedFd<'_>, event: BorrowedFd<'_>) -> io::Result<()> {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut fds = [
        PollFd::new(&src, PollFlags::IN),
        PollFd::new(&event, PollFlags::IN),
    ];
    loop {
        match poll(&mut fds, None) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(err) => return Err(err.into()),
        }
    }
}

/// The CPU the calling thread runs on, if the system says.
#[cfg(target_os = "linux")]
fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu has no preconditions; it returns -1 on failure.
    usize::try_from(unsafe { libc::sched_getcpu() }).ok()
}

#[cfg(not(target_os = "linux"))]
fn current_cpu() -> Option<usize> {
    None
}

/// Keeps the calling thread on `cpu`, the one its owner ran on as it started it. That is
/// where the program freed its previous large message a moment before (the loop's thread
/// frees it, usually just before asking for the next): Linux keeps freed pages in lists per
/// CPU, and a buffer filled on the same CPU gets those pages back, already backed by the
/// host. Filled on the other CPU, a stream's buffers got blocks the host had taken back
/// instead, 5 ms per huge page: on a 2-CPU VM, 7 of 15 runs of 20 × 64 MiB had a message
/// of 120-190 ms, against 2 of 15 kept on the CPU (docs/performance.md). The owner's
/// thread may still run anywhere. If the call fails, the thread runs where the system
/// puts it.
#[cfg(target_os = "linux")]
fn stay_on(cpu: Option<usize>) {
    let Some(cpu) = cpu else {
        return;
    };
    // SAFETY: a zeroed cpu_set_t with one bit set, within its size (CPU_SET checks), for
    // the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu < 8 * std::mem::size_of::<libc::cpu_set_t>() {
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn stay_on(_cpu: Option<usize>) {}

/// Every signal blocked in the calling thread until dropped (then the mask as it was). A
/// thread started meanwhile keeps that mask for good: a signal for the process then goes to
/// one of the program's own threads, as if the reading thread did not exist.
struct BlockedSignals(libc::sigset_t);

impl BlockedSignals {
    fn here() -> BlockedSignals {
        // SAFETY: valid sigset_t values; pthread_sigmask changes only this thread's mask and
        // fills `old` with the mask it replaced.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
            BlockedSignals(old)
        }
    }
}

impl Drop for BlockedSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask `here` saved, on the same thread (the value never
        // leaves `start`).
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut());
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    fn start(src: &impl AsFd, buf: &mut [u8], filled: usize) -> AsideRead {
        // SAFETY: the tests keep `buf` and `src` alive, and do not touch `buf`, until the
        // AsideRead is finished or dropped.
        unsafe { AsideRead::start(src.as_fd(), buf.as_mut_ptr(), buf.len(), filled, None) }
            .expect("thread started")
    }

    fn wait_done(aside: &AsideRead) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !aside.is_done() {
            assert!(Instant::now() < deadline, "the reading thread never ended");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn readable(fd: BorrowedFd<'_>) -> bool {
        use rustix::event::{poll, PollFd, PollFlags};
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        poll(&mut fds, Some(&rustix::event::Timespec::default())).unwrap() == 1
    }

    #[test]
    fn reads_exactly_the_payload_and_leaves_the_next_bytes() {
        let (mut tx, rx) = UnixStream::pair().unwrap();
        rx.set_nonblocking(true).unwrap();
        let payload: Vec<u8> = (0..3 * MAX_IO_CHUNK + 77).map(|i| i as u8).collect();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            tx.write_all(&payload[5..]).unwrap(); // its first 5 bytes were read before
            tx.write_all(b"next frame").unwrap();
            tx
        });
        let mut buf = vec![0u8; 3 * MAX_IO_CHUNK + 77];
        buf[..5].copy_from_slice(&[0, 1, 2, 3, 4]); // as if read before, on the loop
        let aside = start(&rx, &mut buf, 5);
        wait_done(&aside);
        assert!(
            readable(aside.event_fd()),
            "done is signalled on the eventfd"
        );
        let done = aside.finish();
        assert!(matches!(done.end, End::Complete), "{:?}", done.end);
        assert_eq!(done.filled, buf.len());
        assert!(buf.iter().enumerate().all(|(i, &b)| b == i as u8));
        let _tx = writer.join().unwrap();
        let mut rest = [0u8; 32];
        let n = rustix::io::read(&rx, &mut rest).unwrap();
        assert_eq!(&rest[..n], b"next frame");
    }

    #[test]
    fn the_writer_closing_mid_payload_is_an_eof_with_the_bytes_so_far() {
        let (mut tx, rx) = UnixStream::pair().unwrap();
        rx.set_nonblocking(true).unwrap();
        use std::io::Write;
        tx.write_all(&[7u8; 1000]).unwrap();
        drop(tx);
        let mut buf = vec![0u8; 5000];
        let aside = start(&rx, &mut buf, 0);
        wait_done(&aside);
        let done = aside.finish();
        assert!(matches!(done.end, End::Eof), "{:?}", done.end);
        assert_eq!(done.filled, 1000);
        assert!(buf[..1000].iter().all(|&b| b == 7));
    }

    #[test]
    fn a_thread_waiting_for_bytes_stops_when_asked_and_keeps_what_it_read() {
        let (mut tx, rx) = UnixStream::pair().unwrap();
        rx.set_nonblocking(true).unwrap();
        use std::io::Write;
        tx.write_all(&[9u8; 300]).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let aside = start(&rx, &mut buf, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while aside.filled() < 300 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!aside.is_done(), "it waits for the rest");
        let mut aside = aside;
        aside.stop();
        assert!(aside.is_done());
        assert!(readable(aside.event_fd()), "a waiter on the eventfd wakes");
        let done = aside.finish();
        assert!(matches!(done.end, End::Halted), "{:?}", done.end);
        assert_eq!(done.filled, 300);
        // Bytes written after the stop are still there for whoever reads next.
        tx.write_all(b"later").unwrap();
        let mut rest = [0u8; 16];
        let n = rustix::io::read(&rx, &mut rest).unwrap();
        assert_eq!(&rest[..n], b"later");
    }

    #[test]
    fn dropping_a_running_read_stops_and_joins_its_thread() {
        let (_tx, rx) = UnixStream::pair().unwrap();
        rx.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let aside = start(&rx, &mut buf, 0);
        let t0 = Instant::now();
        drop(aside); // must not hang: the thread waits in poll and is woken
        assert!(t0.elapsed() < Duration::from_secs(5));
        drop(buf); // only now may the buffer go
    }

    #[test]
    fn a_read_error_ends_the_thread_with_that_error() {
        // A socket whose peer reset it: read fails with ECONNRESET or ends; a descriptor
        // that is no socket at all, a directory, fails with EISDIR.
        let dir = std::fs::File::open(".").unwrap();
        let mut buf = vec![0u8; 4096];
        let aside = start(&dir, &mut buf, 0);
        wait_done(&aside);
        let done = aside.finish();
        assert!(
            matches!(&done.end, End::Failed(err) if err.raw_os_error() == Some(libc::EISDIR)),
            "{:?}",
            done.end
        );
        assert_eq!(done.filled, 0);
    }

    #[test]
    fn the_reading_thread_blocks_signals_and_stays_on_its_owners_cpu() {
        let (_tx, rx) = UnixStream::pair().unwrap();
        rx.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        // The owner on one known CPU (the last it may use) while it starts the thread.
        // SAFETY: affinity calls on this test's own thread with valid cpu_set_t values.
        let (before, cpu) = unsafe {
            let mut before: libc::cpu_set_t = std::mem::zeroed();
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut before);
            let cpu = (0..libc::CPU_SETSIZE as usize)
                .rfind(|&c| libc::CPU_ISSET(c, &before))
                .unwrap();
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            assert_eq!(
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one),
                0
            );
            (before, cpu)
        };
        let aside = start(&rx, &mut buf, 0);
        // SAFETY: as above.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &before) };
        std::thread::sleep(Duration::from_millis(20)); // in its poll by now
                                                       // Its signal mask, read from /proc: every signal blocked (SigBlk all ones but the
                                                       // two the kernel never lets a thread block).
        let status = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.unwrap().path().join("status")).ok())
            .find(|s| s.contains("Name:\tgipc-read-asid"))
            .expect("the reading thread is listed by name");
        let blocked = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:\t"))
            .unwrap();
        let mask = u64::from_str_radix(blocked.trim(), 16).unwrap();
        // The kernel never blocks SIGKILL and SIGSTOP; glibc keeps its own two (32, 33).
        let kept = [libc::SIGKILL, libc::SIGSTOP, 32, 33]
            .iter()
            .fold(0u64, |m, &sig| m | 1u64 << (sig - 1));
        assert_eq!(mask | kept, u64::MAX, "SigBlk {blocked}");
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:\t"))
            .unwrap();
        assert_eq!(allowed.trim(), cpu.to_string());
        drop(aside);
    }
}
