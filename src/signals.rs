//! Signal dispositions for a freshly forked child.

use pyo3::prelude::*;

/// Puts every signal's disposition back to the default action, at the C level, except
/// SIGPIPE (inherited on purpose) and SIGKILL/SIGSTOP (which cannot be changed).
///
/// Python's `signal.signal()` only knows about handlers installed through Python; an event
/// loop (libev, libuv) installs its own with `sigaction`, which this resets too. One system
/// call per signal, no Python call: a few microseconds for all of them.
///
/// Returns the signals whose disposition was not the default, so the caller can bring
/// Python's own table (what `signal.getsignal()` reports) in line for just those.
#[pyfunction]
pub fn reset_signal_dispositions() -> Vec<i32> {
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
    changed
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn max_signal() -> libc::c_int {
    libc::SIGRTMAX() + 1
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn max_signal() -> libc::c_int {
    32
}
