//! Records on sockets of gipc's own that are not channels (the fork server's start and
//! status sockets): `send_record` and `recv_record`, which take a descriptor number and never
//! own, close or wait on it (see `gipc_wire::io::send_record`).

use std::os::fd::{AsFd, BorrowedFd, IntoRawFd, RawFd};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::os_error;

fn check_fd(fd: RawFd) -> PyResult<()> {
    if fd < 0 {
        return Err(PyValueError::new_err(format!(
            "a descriptor cannot be negative: {fd}"
        )));
    }
    Ok(())
}

/// Sends `data` with the descriptors `fds` on the socket `fd` in one `sendmsg` that never
/// waits nor raises SIGPIPE; returns the bytes sent. OSError as the system says
/// (`BlockingIOError`, `BrokenPipeError`...). `fd` and `fds` stay open and the caller's.
#[pyfunction]
pub fn send_record(fd: RawFd, data: &[u8], fds: Vec<RawFd>) -> PyResult<usize> {
    check_fd(fd)?;
    for &each in &fds {
        check_fd(each)?;
    }
    // SAFETY: non-negative (checked above); borrowed for this call only, during which we
    // hold the GIL and close nothing. One that is not open makes sendmsg fail (EBADF).
    let sock = unsafe { BorrowedFd::borrow_raw(fd) };
    // SAFETY: as for `sock`.
    let passed: Vec<BorrowedFd<'_>> = fds
        .iter()
        .map(|&each| unsafe { BorrowedFd::borrow_raw(each) })
        .collect();
    gipc_wire::io::send_record(sock.as_fd(), data, &passed).map_err(os_error)
}

/// One `recvmsg` that never waits of at most `size` bytes from the socket `fd`: the bytes
/// (empty at the end of the stream) and the descriptors that came, which the caller now
/// owns (close-on-exec). `BlockingIOError` when nothing is there. `fd` stays open.
#[pyfunction]
pub fn recv_record(py: Python<'_>, fd: RawFd, size: usize) -> PyResult<(Py<PyBytes>, Vec<RawFd>)> {
    check_fd(fd)?;
    // SAFETY: non-negative (checked above); borrowed for this call only, during which we
    // hold the GIL and close nothing. One that is not open makes recvmsg fail (EBADF).
    let sock = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut buf = vec![0u8; size];
    let (n, fds) = gipc_wire::io::recv_record(sock, &mut buf).map_err(os_error)?;
    let data = PyBytes::new(py, &buf[..n]).unbind();
    Ok((data, fds.into_iter().map(IntoRawFd::into_raw_fd).collect()))
}
