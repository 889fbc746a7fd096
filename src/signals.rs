//! Signal dispositions for a freshly forked child.

use pyo3::prelude::*;

/// Puts every signal's disposition back to the default action, at the C level, except
/// SIGPIPE (inherited on purpose) and SIGKILL/SIGSTOP (which cannot be changed), and
/// unblocks every signal in the calling thread.
///
/// Python's `signal.signal()` only knows about handlers installed through Python; an event
/// loop (libev, libuv) installs its own with `sigaction`, which this resets too. One system
/// call per signal, no Python call: a few microseconds for all of them. (Doing the same
/// through Python's `signal` module costs a freshly forked child dozens of copy-on-write
/// page faults, each several microseconds on a virtual machine.)
///
/// Returns the signals whose disposition was not the default, so the caller can bring
/// Python's own table (what `signal.getsignal()` reports) in line for just those.
#[pyfunction]
pub fn reset_signal_state() -> Vec<i32> {
    let mut changed = Vec::new();
    for signum in 1..max_signal() {
        if signum == libc::SIGKILL || signum == libc::SIGSTOP || signum == libc::SIGPIPE {
            continue;
        }
        // SAFETY: a zeroed `sigaction` with `SIG_DFL` and an empty mask is a valid
        // disposition for any signal; the C library refuses the signals it reserves with
        // EINVAL, which is ignored. No handler code is involved.
        let previous = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            let mut previous: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = libc::SIG_DFL;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signum, &action, &mut previous) != 0 {
                continue;
            }
            previous.sa_sigaction
        };
        if previous != libc::SIG_DFL {
            changed.push(signum);
        }
    }
    unblock_all_signals();
    changed
}

fn unblock_all_signals() {
    // SAFETY: an empty set built by `sigemptyset` is a valid mask; SIG_SETMASK with it only
    // changes this thread's mask, and a null old-mask pointer is allowed.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn max_signal() -> libc::c_int {
    libc::SIGRTMAX() + 1
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn max_signal() -> libc::c_int {
    32
}

/// `with AllSignalsBlocked():` blocks every signal in the calling thread for the block
/// (SIGKILL and SIGSTOP aside, as the system has it), and puts the thread's mask back as
/// it was when the block is left, in the process that entered it only: a child forked
/// inside keeps every signal blocked until its own start-up resets them.
///
/// Both changes are one call each. Done in Python (read the mask, block, restore in a
/// `finally`), an exception from a handler already due when the block began could come
/// at the first line of the `finally`, before the mask was restored, and leave every
/// signal blocked in the thread for good (and in every process it started since).
#[pyclass(module = "gipc._core")]
pub struct AllSignalsBlocked {
    saved: Option<(libc::sigset_t, libc::pid_t)>,
}

#[pymethods]
impl AllSignalsBlocked {
    #[new]
    fn new() -> Self {
        AllSignalsBlocked { saved: None }
    }

    fn __enter__(mut slf: PyRefMut<'_, Self>) -> PyRefMut<'_, Self> {
        // SAFETY: `sigfillset` fills a zeroed set; SIG_BLOCK with it changes only this
        // thread's mask, and `old` receives the mask as it was.
        let old = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
            old
        };
        // SAFETY: getpid has no preconditions.
        slf.saved = Some((old, unsafe { libc::getpid() }));
        slf
    }

    #[pyo3(signature = (*_exc_info))]
    fn __exit__(&mut self, _exc_info: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        if let Some((old, pid)) = self.saved.take() {
            // SAFETY: getpid has no preconditions; `old` is a mask the system gave us.
            unsafe {
                if libc::getpid() == pid {
                    libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
                }
            }
        }
        false
    }
}
