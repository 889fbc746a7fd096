//! `StartFds`: the descriptors a start makes for its child and nobody owns yet.
//!
//! A start opens pipes, hands some ends to the child, closes those in the parent and gives
//! the rest to the process object. An exception from a signal handler can come between any
//! two of those steps (as a Python call returns), and the start must then close what it
//! still owns: every descriptor once, none that was handed on. Each step here is one call
//! (open and record, close and forget, forget), so that what is recorded is always exactly
//! what the start owns; `close_all` closes it. Dropping the object closes nothing: a
//! descriptor handed on without `hand_on` would otherwise be closed behind its new owner.
//!
//! The fork server's caller keeps the descriptors that come on its control socket in one
//! as well, in the order they came (`receive`), until an offer takes its two (`move_first`).

use std::os::fd::{BorrowedFd, IntoRawFd, RawFd};
use std::sync::Mutex;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyByteArray;

use crate::errors::os_error;

/// A connected pair of Unix stream sockets, close-on-exec.
fn cloexec_socketpair() -> std::io::Result<[RawFd; 2]> {
    let mut ends: [RawFd; 2] = [-1, -1];
    #[cfg(not(target_vendor = "apple"))]
    {
        // SAFETY: `ends` has room for the two descriptors socketpair writes; nothing else.
        let made = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
                ends.as_mut_ptr(),
            )
        };
        if made != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(target_vendor = "apple")]
    {
        // SAFETY: as above; then each end is marked close-on-exec (see `cloexec_pipe`).
        if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, ends.as_mut_ptr()) } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        for fd in ends {
            // SAFETY: `fd` was just opened here.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
    Ok(ends)
}

/// A pipe whose ends are close-on-exec, as `os.pipe()` makes it.
fn cloexec_pipe() -> std::io::Result<[RawFd; 2]> {
    let mut ends: [RawFd; 2] = [-1, -1];
    #[cfg(not(target_vendor = "apple"))]
    {
        // SAFETY: `ends` has room for the two descriptors pipe2 writes; nothing else.
        if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(target_vendor = "apple")]
    {
        // SAFETY: as above, for pipe; then each end is marked close-on-exec (no pipe2 there;
        // the start's own, in a call that holds the GIL: no fork comes between).
        if unsafe { libc::pipe(ends.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for fd in ends {
            // SAFETY: `fd` was just opened here.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
    Ok(ends)
}

#[pyclass(module = "gipc._core", frozen)]
pub struct StartFds {
    owned: Mutex<Vec<RawFd>>,
}

impl StartFds {
    fn owned(&self) -> std::sync::MutexGuard<'_, Vec<RawFd>> {
        // A poisoned lock only means a panic elsewhere; the list itself stays consistent.
        self.owned.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl StartFds {
    #[new]
    fn new() -> Self {
        StartFds {
            owned: Mutex::new(Vec::new()),
        }
    }

    /// A new pipe, close-on-exec, both ends recorded: ``(read_end, write_end)``.
    fn pipe(&self) -> PyResult<(RawFd, RawFd)> {
        let [r, w] = cloexec_pipe().map_err(os_error)?;
        self.owned().extend([r, w]);
        Ok((r, w))
    }

    /// A pidfd for the child ``pid`` (close-on-exec), recorded; None where the system has
    /// none (before Linux 5.3, not Linux) or the child is already reaped.
    fn pidfd(&self, pid: libc::pid_t) -> Option<RawFd> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor (or -1):
            // no memory is passed.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            if fd < 0 {
                return None;
            }
            let fd = fd as RawFd;
            self.owned().push(fd);
            Some(fd)
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let _ = pid;
            None
        }
    }

    /// A new connected pair of Unix stream sockets, close-on-exec, both recorded.
    fn socketpair(&self) -> PyResult<(RawFd, RawFd)> {
        let [one, two] = cloexec_socketpair().map_err(os_error)?;
        self.owned().extend([one, two]);
        Ok((one, two))
    }

    /// One read that never waits of at most ``size`` bytes from the socket ``fd``,
    /// appended to ``into``; every descriptor that came with them recorded, in order (and
    /// -1 for each the kernel dropped, up to ``pad_lost_to`` in all, so that the next
    /// message's descriptors stay its own). Returns the bytes read (0 at the end of the
    /// stream); ``BlockingIOError`` when nothing is there. ``fd`` stays open.
    #[pyo3(signature = (fd, into, size, pad_lost_to = 0))]
    fn receive(
        &self,
        fd: RawFd,
        into: &Bound<'_, PyByteArray>,
        size: usize,
        pad_lost_to: usize,
    ) -> PyResult<usize> {
        if fd < 0 {
            return Err(PyValueError::new_err(format!(
                "a descriptor cannot be negative: {fd}"
            )));
        }
        // SAFETY: non-negative (checked above); borrowed for this call only, during which
        // we hold the GIL and close nothing. One that is not open makes recvmsg fail.
        let sock = unsafe { BorrowedFd::borrow_raw(fd) };
        let mut buf = vec![0u8; size];
        let (n, fds, lost) =
            gipc_wire::io::recv_record_noting_loss(sock, &mut buf).map_err(os_error)?;
        let came = fds.len();
        let mut owned = self.owned();
        owned.extend(fds.into_iter().map(IntoRawFd::into_raw_fd));
        if lost && came < pad_lost_to {
            owned.extend(std::iter::repeat_n(-1, pad_lost_to - came));
        }
        drop(owned);
        let start = into.len();
        // The descriptors are recorded: a failure from here on loses only bytes.
        into.resize(start + n)?;
        // SAFETY: we hold the GIL and no Python code runs between the resize and the copy,
        // so nobody else reads, writes or resizes the bytearray meanwhile; the slice ends
        // with this statement.
        unsafe { into.as_bytes_mut()[start..].copy_from_slice(&buf[..n]) };
        Ok(n)
    }

    /// Hands the ``n`` descriptors recorded first (all, if fewer are) over to ``to``:
    /// recorded there, forgotten here, in one step. Returns those moved.
    fn move_first(&self, n: usize, to: &StartFds) -> PyResult<Vec<RawFd>> {
        if std::ptr::eq(self, to) {
            return Err(PyValueError::new_err("descriptors moved to where they are"));
        }
        let mut owned = self.owned();
        let count = n.min(owned.len());
        let moved: Vec<RawFd> = owned.drain(..count).collect();
        to.owned().extend_from_slice(&moved);
        Ok(moved)
    }

    /// Closes ``fd``, one this start owns, and forgets it (the others keep their order).
    fn close(&self, fd: RawFd) -> PyResult<()> {
        let mut owned = self.owned();
        let at = owned
            .iter()
            .position(|&each| each == fd)
            .ok_or_else(|| PyValueError::new_err(format!("descriptor {fd} is not the start's")))?;
        owned.remove(at);
        if fd >= 0 {
            // SAFETY: the start owns `fd` (it was recorded, and is forgotten just above), so
            // no one else closes it; closed once.
            unsafe { libc::close(fd) };
        }
        Ok(())
    }

    /// Forgets ``fd`` without closing it: it has a new owner. Forgetting one that is not
    /// recorded does nothing.
    fn hand_on(&self, fd: RawFd) {
        self.owned().retain(|&each| each != fd);
    }

    /// Closes every descriptor still recorded, and forgets them.
    fn close_all(&self) {
        for fd in std::mem::take(&mut *self.owned()) {
            if fd >= 0 {
                // SAFETY: recorded, so owned by the start alone; forgotten before closing.
                unsafe { libc::close(fd) };
            }
        }
    }

    /// The descriptors recorded now.
    #[getter]
    fn owned_fds(&self) -> Vec<RawFd> {
        self.owned().clone()
    }
}
