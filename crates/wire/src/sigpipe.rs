//! Pipe writes that report a vanished reader as `EPIPE`, never as a `SIGPIPE`, whatever the
//! process's disposition for that signal, and without changing anything process-wide.
//!
//! A socket write can ask the kernel not to raise the signal (`MSG_NOSIGNAL`); a pipe write
//! cannot. CPython ignores `SIGPIPE`, but many command-line programs put it back to the
//! default action (so that `prog | head` ends quietly), and then a pipe write with no reader
//! left kills the process. A library must not change the disposition, which belongs to the
//! application (and is inherited by every program it `exec`s). What it may change is the
//! calling thread's signal mask, for the duration of its own write: a signal the write raises
//! while blocked stays pending, and is taken back before the mask is restored.
//!
//! When `SIGPIPE` is ignored, as it is in CPython unless the program says otherwise, a write
//! cannot raise it and the mask is left alone: the cost is one `sigaction` query per
//! [`without_sigpipe`] call, not one per write (a call may make many).

use std::io;

/// Runs `write`, which may write to pipes, so that a write to a pipe without readers fails
/// with `EPIPE` and no `SIGPIPE` reaches the process. Only the calling thread's signal mask
/// is touched, and only while `write` runs.
pub fn without_sigpipe<T>(write: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
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
