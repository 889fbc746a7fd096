//! Pipe writes without readers under every SIGPIPE disposition, shared by the test files
//! that run them (each its own process, since the disposition is process-wide).

use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};

use gipc_wire::io::{channel, FdWriter, Transport, WriteSink};
use gipc_wire::sigpipe::without_sigpipe;

pub static HANDLED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn count_sigpipe(_: libc::c_int) {
    HANDLED.fetch_add(1, Ordering::SeqCst);
}

fn set_disposition(handler: libc::sighandler_t) {
    // SAFETY: a zeroed action with an empty mask and a valid handler (or SIG_DFL/SIG_IGN).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler;
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGPIPE, &action, std::ptr::null_mut()),
            0
        );
    }
}

fn sigpipe_set() -> libc::sigset_t {
    // SAFETY: initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        set
    }
}

fn mask(how: libc::c_int) {
    let set = sigpipe_set();
    // SAFETY: valid set; only this thread's mask changes.
    unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
}

fn blocked() -> bool {
    // SAFETY: a null new set only reads the current mask.
    unsafe {
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut old);
        libc::sigismember(&old, libc::SIGPIPE) == 1
    }
}

fn pending() -> bool {
    // SAFETY: sigpending fills a valid set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut set);
        libc::sigismember(&set, libc::SIGPIPE) == 1
    }
}

/// A write to a pipe whose reader is gone, through `without_sigpipe`.
fn write_to_closed_pipe() -> io::Result<usize> {
    let (r, w) = channel(Transport::Pipe).unwrap();
    drop(r);
    without_sigpipe(|| FdWriter::new(w.as_fd(), Transport::Pipe).write_some(&[IoSlice::new(b"x")]))
}

fn expect_broken_pipe() {
    let err = write_to_closed_pipe().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
}

/// Every scenario in turn; the caller chose how pipe writes avoid the signal.
pub fn run_all() {
    // Default action: without the shield, this would kill the test process.
    set_disposition(libc::SIG_DFL);
    expect_broken_pipe();
    assert!(!blocked(), "the thread's mask is restored");
    assert!(!pending(), "the signal the write raised is taken back");

    // A handler: it is not called, as for a socket written with MSG_NOSIGNAL.
    set_disposition(count_sigpipe as *const () as libc::sighandler_t);
    expect_broken_pipe();
    assert_eq!(HANDLED.load(Ordering::SeqCst), 0);
    assert!(!blocked() && !pending());

    // The application blocks SIGPIPE itself: it stays blocked, and nothing is left pending.
    mask(libc::SIG_BLOCK);
    expect_broken_pipe();
    assert!(blocked() && !pending());

    // ... and a SIGPIPE pending before the write is the application's: it is left alone.
    // SAFETY: SIGPIPE is blocked in this thread, so raising it only makes it pending.
    unsafe { libc::raise(libc::SIGPIPE) };
    assert!(pending());
    expect_broken_pipe();
    assert!(blocked() && pending());
    mask(libc::SIG_UNBLOCK);
    assert_eq!(
        HANDLED.load(Ordering::SeqCst),
        1,
        "delivered once unblocked"
    );

    // A successful write under the default action leaves everything as it was.
    set_disposition(libc::SIG_DFL);
    let (r, w) = channel(Transport::Pipe).unwrap();
    let n = without_sigpipe(|| {
        FdWriter::new(w.as_fd(), Transport::Pipe).write_some(&[IoSlice::new(b"ok")])
    })
    .unwrap();
    assert_eq!(n, 2);
    assert!(!blocked() && !pending());
    drop((r, w));
    set_disposition(libc::SIG_IGN);
}
