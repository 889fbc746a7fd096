//! `ClaimWord`: the claim word a pool worker shares with its parent (`gipc.pool._claims`),
//! on `gipc_wire::claims`.

use std::os::fd::BorrowedFd;

use gipc_wire::claims::{self, SharedWord};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::os_error;

#[pyclass(module = "gipc._core")]
pub struct ClaimWord {
    shared: Option<SharedWord>,
}

impl ClaimWord {
    fn word(&self) -> PyResult<&std::sync::atomic::AtomicU64> {
        match &self.shared {
            Some(shared) => Ok(shared.word()),
            None => Err(PyValueError::new_err("the claim word is closed")),
        }
    }
}

#[pymethods]
impl ClaimWord {
    /// A new word in anonymous shared memory, shared with children forked from now on.
    #[staticmethod]
    fn anonymous() -> PyResult<Self> {
        let shared = SharedWord::anonymous().map_err(os_error)?;
        Ok(ClaimWord {
            shared: Some(shared),
        })
    }

    /// The word at the start of the file ``fd`` refers to (at least 8 bytes long), mapped
    /// shared; ``fd`` stays the caller's.
    #[staticmethod]
    fn from_fd(fd: i32) -> PyResult<Self> {
        if fd < 0 {
            return Err(PyValueError::new_err("negative file descriptor"));
        }
        // SAFETY: the descriptor is only borrowed for the mmap call; an invalid one makes
        // mmap fail with EBADF.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let shared = SharedWord::from_fd(borrowed).map_err(os_error)?;
        Ok(ClaimWord {
            shared: Some(shared),
        })
    }

    /// In the worker: whether it may run task ``number`` (False: the parent revoked it).
    fn claim(&self, number: u64) -> PyResult<bool> {
        Ok(claims::claim(self.word()?, number))
    }

    /// In the parent: revokes the tasks up to ``through`` (the last one sent) that the
    /// worker has not claimed; returns the last one it claimed.
    fn revoke(&self, through: u64) -> PyResult<u64> {
        Ok(claims::revoke(self.word()?, through))
    }

    /// The last task the worker claimed; ``reference`` is a task number at or after it
    /// (the last one sent).
    fn claimed(&self, reference: u64) -> PyResult<u64> {
        Ok(claims::claimed(self.word()?, reference))
    }

    /// Unmaps the word; later calls raise ValueError.
    fn close(&mut self) {
        self.shared = None;
    }
}
