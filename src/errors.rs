//! The one place where Rust errors become Python exceptions.
//!
//! `GIPCError` and its subclasses are defined once, in `gipc/exceptions.py`, and imported
//! here; `OSError`s keep their errno, so `EPIPE` arrives as `BrokenPipeError`.

use gipc_wire::frame::FrameError;
use gipc_wire::io::{EndError, FdsError};
use gipc_wire::recv::RecvError;
use pyo3::exceptions::{PyEOFError, PyMemoryError, PyOSError};
use pyo3::PyErr;

pyo3::import_exception!(gipc.exceptions, GIPCError);
pyo3::import_exception!(gipc.exceptions, GIPCClosed);
pyo3::import_exception!(gipc.exceptions, GIPCValueError);

pub fn closed() -> PyErr {
    GIPCClosed::new_err("the handle is closed")
}

/// An `OSError` that keeps the errno: Python's `OSError(errno, strerror)` picks the subclass
/// (`BrokenPipeError` for `EPIPE`...) and sets `.errno`, which PyO3's own conversion leaves
/// `None`.
pub fn os_error(err: std::io::Error) -> PyErr {
    match err.raw_os_error() {
        Some(errno) => {
            let text = err.to_string();
            // Python prints "[Errno N] ..." itself; Rust's text ends in "(os error N)".
            let strerror = text
                .strip_suffix(&format!(" (os error {errno})"))
                .unwrap_or(&text);
            PyOSError::new_err((errno, strerror.to_owned()))
        }
        None => PyErr::from(err),
    }
}

pub fn recv_error(err: RecvError) -> PyErr {
    match err {
        RecvError::Eof => PyEOFError::new_err(err.to_string()),
        RecvError::Io(io) => os_error(io),
        RecvError::Alloc { .. } => PyMemoryError::new_err(err.to_string()),
        RecvError::Torn { .. } | RecvError::Frame(_) | RecvError::LostAtFork => {
            GIPCError::new_err(err.to_string())
        }
    }
}

/// A message whose descriptors did not all come: `GIPCError`, saying why if the kernel
/// dropped them (the receiving process at its descriptor limit).
pub fn fds_error(err: FdsError) -> PyErr {
    GIPCError::new_err(err.to_string())
}

pub fn frame_error(err: FrameError) -> PyErr {
    GIPCError::new_err(err.to_string())
}

/// Descriptors that cannot be the end they were offered as: a wrong value (`GIPCValueError`),
/// or a failed `fstat`/`fcntl` (`OSError`, e.g. `EBADF` for one that is not open).
pub fn end_error(err: EndError) -> PyErr {
    match err {
        EndError::Io(io) => os_error(io),
        other => GIPCValueError::new_err(other.to_string()),
    }
}

/// A handle that cannot move to another process now (see `transfer_state`).
pub fn cannot_transfer(why: &str) -> PyErr {
    GIPCError::new_err(format!(
        "cannot move this end to another process now: {why}"
    ))
}
