//! `Writer.try_send` with CPython's "fastcall" convention: the arguments arrive as a C
//! array, where PyO3's methods in this build receive a new tuple.
//!
//! The extension is one `abi3` build for CPython 3.9 and later, and the limited API of 3.9
//! has no fastcall, so PyO3 gives every method with arguments `METH_VARARGS`: each call
//! builds a tuple of its arguments, then PyO3 parses it against the signature, and the tuple
//! is freed. For the call made once per `put` that was ~75 ns of ~615 (`try_send` in
//! `benches/per_message.py same`, fastest rounds: 615 -> 538 ns; docs/performance.md). `METH_FASTCALL` itself is older than the limited
//! API's name for it: every CPython since 3.7 calls such a method the same way, with the
//! same flag value, which is what the limited API of 3.10 later made official. So this one
//! method is defined by hand, with PyO3's own fastcall trampoline (the one PyO3 uses in
//! builds that have the flag: it attaches PyO3's view of the interpreter and turns errors
//! and panics into Python exceptions), and put into the class's dictionary when the module
//! is initialised.

use std::os::raw::c_int;

use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyType;

use crate::handle::Writer;

/// `METH_FASTCALL | METH_KEYWORDS` (CPython's Include/methodobject.h, unchanged since 3.7).
const FASTCALL_WITH_KEYWORDS: c_int = 0x0080 | ffi::METH_KEYWORDS;

const DOC: &std::ffi::CStr = c"try_send($self, kind, payload, /)\n--\n\n\
Queues one frame and writes what the descriptor takes now. Returns DONE, WOULD_BLOCK (wait \
until writable, then try_flush) or YIELD (let the loop run, then try_flush).";

/// The body of `Writer.try_send`, called by PyO3's fastcall trampoline.
///
/// # Safety
/// CPython's fastcall contract: `slf` is an instance of the class the descriptor belongs to
/// (CPython checks it), `args` points to `nargs` borrowed references, and `kwnames` is null
/// or a tuple of keyword names whose values follow the positional ones.
unsafe fn try_send(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    if nargs != 2 || !kwnames.is_null() {
        return Err(PyTypeError::new_err(
            "try_send() takes exactly two positional arguments (kind, payload)",
        ));
    }
    // SAFETY: per this function's contract, `slf` and the two arguments are valid borrowed
    // references for the duration of the call.
    let (slf, kind, payload) = unsafe {
        (
            Borrowed::from_ptr(py, slf),
            Borrowed::from_ptr(py, *args),
            Borrowed::from_ptr(py, *args.add(1)),
        )
    };
    let writer = slf.cast::<Writer>()?;
    let kind: u8 = kind.extract()?;
    let status = writer.try_borrow_mut()?.try_send(py, kind, &payload)?;
    Ok(status.into_ptr())
}

/// Replaces the class's `try_send` with the fastcall one.
pub fn install(writer_class: &Bound<'_, PyType>) -> PyResult<()> {
    let py = writer_class.py();
    let trampoline = pyo3::get_trampoline_function!(fastcall_cfunction_with_keywords, try_send);
    // The definition must outlive the class: one per module initialisation, never freed.
    let def = Box::leak(Box::new(ffi::PyMethodDef {
        ml_name: c"try_send".as_ptr(),
        ml_meth: ffi::PyMethodDefPointer {
            // SAFETY: with METH_FASTCALL in `ml_flags`, CPython casts `ml_meth` back to the
            // fastcall-with-keywords signature, which is the trampoline's; the union's field
            // for that signature exists in PyO3 only for builds whose limited API has it.
            PyCFunction: unsafe {
                std::mem::transmute::<
                    unsafe extern "C" fn(
                        *mut ffi::PyObject,
                        *const *mut ffi::PyObject,
                        ffi::Py_ssize_t,
                        *mut ffi::PyObject,
                    ) -> *mut ffi::PyObject,
                    ffi::PyCFunction,
                >(trampoline)
            },
        },
        ml_flags: FASTCALL_WITH_KEYWORDS,
        ml_doc: DOC.as_ptr(),
    }));
    // SAFETY: a valid type object and a method definition that lives forever; the result is
    // a new reference or null with an exception set.
    let descriptor = unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyDescr_NewMethod(writer_class.as_ptr().cast(), def),
        )?
    };
    writer_class.setattr("try_send", descriptor)
}
