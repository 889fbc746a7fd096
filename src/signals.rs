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
