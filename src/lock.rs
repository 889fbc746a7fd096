//! `HandleLock`: who may do I/O on one handle, one greenlet at a time, of whichever thread.
//!
//! gevent's semaphores belong to one thread's hub; sharing one between threads (each
//! waiting on its own hub) can deadlock. So the exclusion itself is a flag that no one ever
//! blocks on, and waiting is split by kind: the greenlets of one thread queue on that
//! thread's own gevent semaphore (woken in order, through their hub), and the one greenlet a
//! thread lets through, if it finds another thread holding the flag, sleeps cooperatively
//! and looks again (from 1 ms, backing off to 5 ms). Only programs that share a handle
//! between threads ever take that path.
//!
//! Why in Rust: Python runs signal handlers between any two bytecodes, so an exception a
//! handler raises (Ctrl-C's `KeyboardInterrupt`, an alarm's) could land between taking the
//! thread's semaphore and the flag, or between taking them and the `with` block that lets
//! them go: the handle then stayed locked with no greenlet in it, and every later `get` or
//! `put` waited for ever. Here every change of state is made inside one call from Python
//! (`__enter__`, `__exit__`, `try_acquire`), with no bytecode of this greenlet run between
//! the change and the return, and a wait that fails while the semaphore is held lets it go
//! before the error goes on. `with lock:` calls `__enter__` and enters its block with no
//! check for signals in between.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3::{PyTraverseError, PyVisit};

pyo3::import_exception!(gipc.exceptions, GIPCLocked);

/// Sleeps between two looks at a flag another thread holds: libuv's timer resolution
/// first, doubling up to 5 ms.
const FIRST_SLEEP: f64 = 0.001;
const LONGEST_SLEEP: f64 = 0.005;

#[pyclass(module = "gipc._core", frozen)]
pub struct HandleLock {
    /// Set while a greenlet does I/O on the handle.
    held: AtomicBool,
    /// The greenlet that holds it (None when free).
    owner: Mutex<Option<Py<PyAny>>>,
    /// Thread ident -> that thread's gevent semaphore, made on first need.
    queues: Py<PyDict>,
    /// `greenlet.getcurrent`, the system's `_thread.get_ident`, a maker of gevent
    /// semaphores and a cooperative `sleep(seconds)`, given by the Python layer (which
    /// imports gevent only when it must).
    getcurrent: Py<PyAny>,
    get_ident: Py<PyAny>,
    new_queue: Py<PyAny>,
    sleep: Py<PyAny>,
}

impl HandleLock {
    /// Whether a greenlet does I/O on the handle now: the handles' fast paths look here.
    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    fn owner(&self) -> std::sync::MutexGuard<'_, Option<Py<PyAny>>> {
        // The GIL serialises every caller: the mutex is never contended, and a panic
        // cannot poison it halfway through a change.
        self.owner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// This thread's semaphore, made on first need.
    fn queue<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let ident = self.get_ident.bind(py).call0()?;
        let queues = self.queues.bind(py);
        if let Some(queue) = queues.get_item(&ident)? {
            return Ok(queue);
        }
        let queue = self.new_queue.bind(py).call0()?;
        // Another greenlet may have made one while `new_queue` ran Python code.
        if let Some(made) = queues.get_item(&ident)? {
            return Ok(made);
        }
        queues.set_item(&ident, &queue)?;
        Ok(queue)
    }

    /// Raises `GIPCLocked` if `current` holds the lock already: waiting would be waiting
    /// for itself (a decoder that calls `get()` on its own reader, say).
    fn refuse_reentry(&self, py: Python<'_>, current: &Bound<'_, PyAny>) -> PyResult<()> {
        if self
            .owner()
            .as_ref()
            .is_some_and(|owner| owner.bind(py).is(current))
        {
            return Err(GIPCLocked::new_err(
                "this greenlet is already using the handle (a codec that uses its own \
                 handle?): it would wait for itself for ever",
            ));
        }
        Ok(())
    }

    /// Takes the flag for `current`, whose thread's semaphore is held; false if another
    /// thread holds the flag.
    fn take_flag(&self, current: Bound<'_, PyAny>) -> bool {
        if self.held.swap(true, Ordering::AcqRel) {
            return false;
        }
        *self.owner() = Some(current.unbind());
        true
    }

    fn acquire_queue(queue: &Bound<'_, PyAny>, blocking: bool) -> PyResult<bool> {
        queue
            .call_method1(pyo3::intern!(queue.py(), "acquire"), (blocking,))?
            .is_truthy()
    }

    fn release_queue(queue: &Bound<'_, PyAny>) -> PyResult<()> {
        queue.call_method0(pyo3::intern!(queue.py(), "release"))?;
        Ok(())
    }
}

#[pymethods]
impl HandleLock {
    #[new]
    fn new(
        py: Python<'_>,
        getcurrent: Py<PyAny>,
        get_ident: Py<PyAny>,
        new_queue: Py<PyAny>,
        sleep: Py<PyAny>,
    ) -> Self {
        HandleLock {
            held: AtomicBool::new(false),
            owner: Mutex::new(None),
            queues: PyDict::new(py).unbind(),
            getcurrent,
            get_ident,
            new_queue,
            sleep,
        }
    }

    /// Whether a greenlet does I/O on the handle now.
    fn locked(&self) -> bool {
        self.is_held()
    }

    /// Takes the lock, waiting cooperatively; returns True if that meant waiting (other
    /// greenlets or threads ran meanwhile, so what the caller saw of the channel before may
    /// be stale). `GIPCLocked` if the calling greenlet holds it already.
    fn __enter__(&self, py: Python<'_>) -> PyResult<bool> {
        let current = self.getcurrent.bind(py).call0()?;
        self.refuse_reentry(py, &current)?;
        let queue = self.queue(py)?;
        let mut waited = false;
        if !Self::acquire_queue(&queue, false)? {
            waited = true;
            // Woken in order, through this thread's hub. An error (a timeout, a kill, a
            // signal handler's exception) means the semaphore was not taken.
            Self::acquire_queue(&queue, true)?;
        }
        let mut delay = FIRST_SLEEP;
        while !self.take_flag(current.clone()) {
            waited = true;
            if let Err(err) = self.sleep.bind(py).call1((delay,)) {
                Self::release_queue(&queue)?;
                return Err(err);
            }
            delay = (delay * 2.0).min(LONGEST_SLEEP);
        }
        Ok(waited)
    }

    /// Lets the lock go (the exception, if any, goes on).
    #[pyo3(signature = (*_exc_info))]
    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_info: &Bound<'_, pyo3::types::PyTuple>,
    ) -> PyResult<()> {
        self.release(py)
    }

    /// Takes the lock only if that needs no wait (nobody holds it or queues for it in this
    /// thread); True if taken. For a handle that travels in a message: held by the `put`
    /// that sends it, never waited for.
    fn try_acquire(&self, py: Python<'_>) -> PyResult<bool> {
        let current = self.getcurrent.bind(py).call0()?;
        let queue = self.queue(py)?;
        if !Self::acquire_queue(&queue, false)? {
            return Ok(false);
        }
        if !self.take_flag(current) {
            Self::release_queue(&queue)?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Lets the lock go: the next greenlet of this thread, or another thread, may take it.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        let queue = self.queue(py)?;
        let owner = self.owner().take();
        self.held.store(false, Ordering::Release);
        drop(owner);
        Self::release_queue(&queue)
    }

    /// The per-thread semaphores (for tests that stand in for a greenlet queued ahead).
    #[getter]
    fn _queues(&self, py: Python<'_>) -> Py<PyDict> {
        self.queues.clone_ref(py)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.queues)?;
        visit.call(&self.getcurrent)?;
        visit.call(&self.get_ident)?;
        visit.call(&self.new_queue)?;
        visit.call(&self.sleep)?;
        if let Ok(owner) = self.owner.try_lock() {
            if let Some(owner) = owner.as_ref() {
                visit.call(owner)?;
            }
        }
        Ok(())
    }
}
