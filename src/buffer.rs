//! A read-only view of any object's contiguous buffer (the buffer protocol), held until
//! dropped. PyO3 offers this only for the stable ABI of Python 3.11+ (where the protocol
//! joined the limited API); this module supports 3.9 and 3.10 too, whose libpython exports
//! the same two functions with the same `Py_buffer` layout (unchanged since Python 3.3).

use std::ffi::{c_char, c_int, c_void};
use std::ptr::NonNull;

use pyo3::ffi;
use pyo3::prelude::*;

/// CPython's `Py_buffer`.
#[repr(C)]
struct RawView {
    buf: *mut c_void,
    obj: *mut ffi::PyObject,
    len: ffi::Py_ssize_t,
    itemsize: ffi::Py_ssize_t,
    readonly: c_int,
    ndim: c_int,
    format: *mut c_char,
    shape: *mut ffi::Py_ssize_t,
    strides: *mut ffi::Py_ssize_t,
    suboffsets: *mut ffi::Py_ssize_t,
    internal: *mut c_void,
}

/// `PyBUF_SIMPLE`: one contiguous run of bytes; an exporter that cannot give that (a
/// strided view) raises `BufferError` instead.
const PYBUF_SIMPLE: c_int = 0;

extern "C" {
    fn PyObject_GetBuffer(obj: *mut ffi::PyObject, view: *mut RawView, flags: c_int) -> c_int;
    fn PyBuffer_Release(view: *mut RawView);
}

/// An exported buffer: while it exists the exporter may neither move nor free the memory
/// (a `bytearray` refuses to resize, for one).
pub struct HeldView {
    // Boxed: some exporters point fields of the view into the view itself.
    view: Box<RawView>,
}

impl HeldView {
    /// The object's buffer as one contiguous run of bytes; the exporter's own error
    /// (`TypeError`, `BufferError`) when it has none.
    pub fn get(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        let mut view = Box::new(RawView {
            buf: std::ptr::null_mut(),
            obj: std::ptr::null_mut(),
            len: 0,
            itemsize: 0,
            readonly: 0,
            ndim: 0,
            format: std::ptr::null_mut(),
            shape: std::ptr::null_mut(),
            strides: std::ptr::null_mut(),
            suboffsets: std::ptr::null_mut(),
            internal: std::ptr::null_mut(),
        });
        // SAFETY: `obj` is a live object (we hold a reference and the GIL) and `view` points
        // to writable memory laid out as `Py_buffer`, which the call fills in.
        let status = unsafe { PyObject_GetBuffer(obj.as_ptr(), &mut *view, PYBUF_SIMPLE) };
        if status != 0 {
            return Err(PyErr::fetch(obj.py()));
        }
        Ok(HeldView { view })
    }

    /// The start of the bytes (dangling but aligned when there are none).
    pub fn data(&self) -> NonNull<u8> {
        NonNull::new(self.view.buf.cast::<u8>()).unwrap_or(NonNull::dangling())
    }

    pub fn len(&self) -> usize {
        usize::try_from(self.view.len).unwrap_or(0)
    }
}

impl Drop for HeldView {
    fn drop(&mut self) {
        Python::attach(|_| {
            // SAFETY: the view was filled in by a successful PyObject_GetBuffer and is
            // released exactly once, here, with the GIL held.
            unsafe { PyBuffer_Release(&mut *self.view) }
        });
    }
}
