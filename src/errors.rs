//! The one place where Rust errors become Python exceptions.
//!
//! `GIPCError` and its subclasses are defined once, in `gipc/exceptions.py`, and imported
//! here; `OSError`s keep their errno, so `EPIPE` arrives as `BrokenPipeError`.

use gipc_wire::frame::FrameError;
use gipc_wire::recv::RecvError;
use pyo3::exceptions::{PyEOFError, PyMemoryError};
use pyo3::PyErr;

pyo3::import_exception!(gipc.exceptions, GIPCError);
pyo3::import_exception!(gipc.exceptions, GIPCClosed);

pub fn closed() -> PyErr {
    GIPCClosed::new_err("the handle is closed")
}

pub fn recv_error(err: RecvError) -> PyErr {
    match err {
        RecvError::Eof => PyEOFError::new_err(err.to_string()),
        RecvError::Io(io) => PyErr::from(io),
        RecvError::Alloc { .. } => PyMemoryError::new_err(err.to_string()),
        RecvError::Torn { .. } | RecvError::Frame(_) => GIPCError::new_err(err.to_string()),
    }
}

pub fn frame_error(err: FrameError) -> PyErr {
    GIPCError::new_err(err.to_string())
}
