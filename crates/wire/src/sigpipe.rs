//! Pipe writes that report a vanished reader as `EPIPE`, never as a `SIGPIPE`, whatever the
//! process's disposition for that signal, and without changing anything process-wide.
//!
//! CPython ignores `SIGPIPE`, but many command-line programs put it back to the default
//! action (so that `prog | head` ends quietly), and then a pipe write with no reader left
//! kills the process. A library must not change the disposition, which belongs to the
//! application (and is inherited by every program it `exec`s). A socket write can ask the
//! kernel not to raise the signal (`MSG_NOSIGNAL`); for a pipe there are two ways:
//!
//! * Recent Linux kernels (6.18 has it) take `RWF_NOSIGNAL` on `pwritev2`: [`writev_pipe`]
//!   uses it, at the cost of a plain `writev`. Whether the kernel has it is learnt from the
//!   first write. That cost is above a `write`'s: on a 2-core VM (6.18, 108-byte writes into
//!   a pipe from C, fastest of 2,000 rounds) `write` took ~300 ns, `writev` and `pwritev2`
//!   with one buffer ~400 ns, with or without the flag (the vector is imported from user
//!   memory). No call that writes a plain buffer to a pipe takes a flag (`send` is for
//!   sockets, `splice` and `vmsplice` raise the signal too), so the ~100 ns stay.
//! * Elsewhere, [`without_sigpipe`] blocks `SIGPIPE` in the calling thread for the duration
//!   of its writes: a signal a write raises while blocked stays pending, and is taken back
//!   before the mask is restored. When `SIGPIPE` is ignored, a write cannot raise it and the
//!   mask is left alone; the cost is then one `sigaction` query per call (about 0.2 us on a
//!   virtual machine: a fifth of the time of a small `put`), not one per write.

use std::io::{self, IoSlice};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU8, Ordering};

/// Whether the kernel takes `RWF_NOSIGNAL`: not known before the first pipe write.
static KERNEL_FLAG: AtomicU8 = AtomicU8::new(UNKNOWN);
const UNKNOWN: u8 = 0;
const SUPPORTED: u8 = 1;
const UNSUPPORTED: u8 = 2;

/// `RWF_NOSIGNAL` (include/uapi/linux/fs.h); older kernels refuse the unknown
/// flag with `EOPNOTSUPP` before writing anything.
#[cfg(any(target_os = "linux", target_os = "android"))]
const RWF_NOSIGNAL: u32 = 0x100;

/// `GIPC_PIPE_NOSIGNAL=0` keeps the kernel flag unused, so that the signal mask way can be
/// tested (and compared) on a kernel that has the flag.
const DISABLE_VAR: &str = "GIPC_PIPE_NOSIGNAL";

/// One gathering write to a pipe. With the kernel flag it raises no `SIGPIPE`; without it,
/// call it inside [`without_sigpipe`].
#[inline]
pub fn writev_pipe(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> rustix::io::Result<usize> {
    match KERNEL_FLAG.load(Ordering::Relaxed) {
        SUPPORTED => writev_nosignal(fd, bufs),
        UNKNOWN => first_writev(fd, bufs),
        _ => rustix::io::writev(fd, bufs),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn writev_nosignal(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> rustix::io::Result<usize> {
    let flags = rustix::io::ReadWriteFlags::from_bits_retain(RWF_NOSIGNAL);
    // Offset -1: the "current position", which is what a pipe has.
    rustix::io::pwritev2(fd, bufs, u64::MAX, flags)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn writev_nosignal(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> rustix::io::Result<usize> {
    rustix::io::writev(fd, bufs)
}

/// The first pipe write of the process, which learns whether the kernel has the flag.
#[cold]
#[inline(never)]
fn first_writev(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> rustix::io::Result<usize> {
    use rustix::io::Errno;
    let wanted = cfg!(any(target_os = "linux", target_os = "android"))
        && !matches!(std::env::var_os(DISABLE_VAR), Some(v) if v == "0");
    if wanted {
        match writev_nosignal(fd, bufs) {
            Err(Errno::OPNOTSUPP | Errno::NOSYS) => {}
            result => {
                // The flags are checked before anything else that could fail here.
                if matches!(result, Ok(_) | Err(Errno::AGAIN | Errno::PIPE)) {
                    KERNEL_FLAG.store(SUPPORTED, Ordering::Relaxed);
                }
                return result;
            }
        }
    }
    KERNEL_FLAG.store(UNSUPPORTED, Ordering::Relaxed);
    rustix::io::writev(fd, bufs)
}

/// Runs `write`, which may write to pipes with [`writev_pipe`], so that a write to a pipe
/// without readers fails with `EPIPE` and no `SIGPIPE` reaches the process. Only the calling
/// thread's signal mask is touched, only while `write` runs, and only when the kernel cannot
/// be asked not to raise the signal.
#[inline]
pub fn without_sigpipe<T>(write: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    if KERNEL_FLAG.load(Ordering::Relaxed) == SUPPORTED {
        return write();
    }
    shielded(write)
}

fn shielded<T>(write: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let shield = Shield::raise();
    let result = write();
    if let Err(err) = &result {
        if err.kind() == io::ErrorKind::BrokenPipe {
            shield.take_back_signal();
        }
    }
    result
}

/// What [`Shield::raise`] changed, undone when it is dropped.
enum Shield {
    /// `SIGPIPE` is ignored: writes cannot raise it.
    Idle,
    /// `SIGPIPE` is blocked in this thread.
    Up {
        /// It was blocked already (by the application): leave it so.
        was_blocked: bool,
        /// One was pending already: it is the application's, not ours to take.
        was_pending: bool,
    },
}

impl Shield {
    fn raise() -> Shield {
        if sigpipe_ignored() {
            return Shield::Idle;
        }
        let set = sigpipe_set();
        // SAFETY: both sets are valid `sigset_t`s; SIG_BLOCK only changes this thread's mask.
        let was_blocked = unsafe {
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            libc::sigismember(&old, libc::SIGPIPE) == 1
        };
        // While it was unblocked here, a pending SIGPIPE would have been delivered already.
        let was_pending = was_blocked && sigpipe_pending();
        Shield::Up {
            was_blocked,
            was_pending,
        }
    }

    /// Removes the SIGPIPE that a failed write raised, if there is one and it is ours.
    fn take_back_signal(&self) {
        if let Shield::Up {
            was_pending: false, ..
        } = self
        {
            take_pending_sigpipe();
        }
    }
}

impl Drop for Shield {
    fn drop(&mut self) {
        if let Shield::Up {
            was_blocked: false, ..
        } = self
        {
            let set = sigpipe_set();
            // SAFETY: a valid set; SIG_UNBLOCK only changes this thread's mask.
            unsafe {
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            }
        }
    }
}

fn sigpipe_ignored() -> bool {
    // SAFETY: a null new action only reads the current one into `current`.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    }
}

fn sigpipe_set() -> libc::sigset_t {
    // SAFETY: `sigemptyset` initialises the set before `sigaddset` uses it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        set
    }
}

fn sigpipe_pending() -> bool {
    // SAFETY: `sigpending` fills a valid set.
    unsafe {
        let mut pending: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut pending) == 0 && libc::sigismember(&pending, libc::SIGPIPE) == 1
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn take_pending_sigpipe() {
    let set = sigpipe_set();
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid set and timeout; with a zero timeout this never waits, and it fails with
    // EAGAIN when nothing is pending (a socket write raises no signal).
    unsafe {
        while libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) == -1
            && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
        {}
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn take_pending_sigpipe() {
    // No sigtimedwait: sigwait returns at once when the signal is known to be pending.
    if sigpipe_pending() {
        let set = sigpipe_set();
        let mut signal = 0;
        // SAFETY: valid set and output; the signal is pending and blocked, so this returns.
        unsafe {
            libc::sigwait(&set, &mut signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The disposition is process-wide, so the tests that change it run in their own
    // process: see tests/sigpipe.rs. Here it stays ignored, as the test harness leaves it.

    #[test]
    fn an_ignored_sigpipe_leaves_the_mask_alone() {
        assert!(sigpipe_ignored());
        assert!(matches!(Shield::raise(), Shield::Idle));
        let result: io::Result<()> = without_sigpipe(|| Err(io::ErrorKind::BrokenPipe.into()));
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }
}
