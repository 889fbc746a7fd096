//! The calls made once per message, with CPython's "fastcall" convention (the arguments
//! arrive as a C array, where PyO3's methods in this build receive a new tuple): the core's
//! `Writer.try_send`, and the handles' own `put` and `get` for their common cases, which
//! then run without a Python frame either (`PutPath`, `GetPath`: what they need, looked up
//! once per handle).
//!
//! The extension is one `abi3` build for CPython 3.9 and later, and the limited API of 3.9
//! has no fastcall, so PyO3 gives every method with arguments `METH_VARARGS`: each call
//! builds a tuple of its arguments, then PyO3 parses it against the signature, and the tuple
//! is freed. For the call made once per `put` that was ~75 ns of ~615 (`try_send` in
//! `benches/per_message.py same`, fastest rounds: 615 -> 538 ns; docs/performance.md).
//! `METH_FASTCALL` itself is older than the limited API's name for it: every CPython since
//! 3.7 calls such a method the same way, with the same flag value, which is what the limited
//! API of 3.10 later made official. So these methods are defined by hand, with PyO3's own
//! fastcall trampoline (the one PyO3 uses in builds that have the flag: it attaches PyO3's
//! view of the interpreter and turns errors and panics into Python exceptions), and put
//! into the class's dictionary when the module is initialised (`try_send`) or when the
//! Python module defines the handle classes (`install_put`, `install_get`).

use std::os::raw::c_int;

use gipc_wire::send::Progress;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyType;
use pyo3::{PyTraverseError, PyVisit};

use crate::handle::{Reader, Received, Writer};
use crate::lock::HandleLock;

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
    let trampoline = pyo3::get_trampoline_function!(fastcall_cfunction_with_keywords, try_send);
    set_method(
        writer_class,
        "try_send",
        fastcall_def(c"try_send", DOC.as_ptr(), trampoline),
    )
}

/// A handle's codec, as its fast path sees it: a writer's encoder (`PutPath`) or a
/// reader's decoder (`GetPath`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Codec {
    /// pickle. A writer whose pipe uses pickle both ways sends `bytes` as they are
    /// (`KIND_BYTES`) and pickles the rest; a reader unpickles with `pickle.loads`.
    Pickle,
    /// None: a writer sends `bytes` as they are (`KIND_ENCODED`; anything else is checked
    /// in Python); a reader returns the payload as it came.
    Raw,
    /// The application's: a writer's Python `put` does everything, a reader's `_decode`
    /// calls it.
    Other,
}

impl Codec {
    /// From its name, "pickle", "raw" or "other", as the Python layer gives it;
    /// `parameter` names the argument for the error.
    fn from_name(name: &str, parameter: &str) -> PyResult<Self> {
        match name {
            "pickle" => Ok(Codec::Pickle),
            "raw" => Ok(Codec::Raw),
            "other" => Ok(Codec::Other),
            _ => Err(PyValueError::new_err(format!(
                "unknown {parameter} {name:?}"
            ))),
        }
    }
}

/// What the writer handle's `put` needs, looked up once per handle (its `_fast` attribute):
/// the common cases of `put` then run here, without a Python frame, and everything else in
/// the handle's own Python code.
#[pyclass(module = "gipc._core", frozen)]
pub struct PutPath {
    writer: Py<Writer>,
    /// The lock the handle holds while it does I/O.
    lock: Py<HandleLock>,
    codecs: Codec,
    /// `pickle.dumps`, and the protocol to give it.
    dumps: Py<PyAny>,
    protocol: Py<PyAny>,
    /// What `dumps` raises for messages that hold gipc handles.
    not_picklable: Py<PyAny>,
}

#[pymethods]
impl PutPath {
    /// `codecs`: "pickle", "raw" or "other" (see `Codec`).
    #[new]
    fn new(
        writer: Py<Writer>,
        lock: Py<HandleLock>,
        codecs: &str,
        dumps: Py<PyAny>,
        protocol: Py<PyAny>,
        not_picklable: Py<PyAny>,
    ) -> PyResult<Self> {
        let codecs = Codec::from_name(codecs, "codecs")?;
        Ok(PutPath {
            writer,
            lock,
            codecs,
            dumps,
            protocol,
            not_picklable,
        })
    }

    /// What it holds, for the cycle collector (see `GetPath::__traverse__`).
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.writer)?;
        visit.call(&self.lock)?;
        visit.call(&self.dumps)?;
        visit.call(&self.protocol)?;
        visit.call(&self.not_picklable)
    }
}

/// Where a `put` goes on from here.
enum Route<'py> {
    /// Written whole, or queued with this progress to finish under the lock.
    Sent(Progress),
    /// Another greenlet does I/O on the handle: this frame waits for the lock.
    Locked(gipc_wire::frame::Kind, Bound<'py, PyAny>),
    /// The handle's Python `put` does it all (other codecs, other payloads).
    Python,
    /// A message that holds handles (`_put_with_handles`).
    WithHandles,
}

fn route<'py>(
    py: Python<'py>,
    path: &PutPath,
    o: &Borrowed<'_, 'py, PyAny>,
) -> PyResult<Route<'py>> {
    if path.codecs == Codec::Other {
        return Ok(Route::Python);
    }
    let (kind, payload) = if o.is_exact_instance_of::<pyo3::types::PyBytes>() {
        let kind = match path.codecs {
            Codec::Pickle => gipc_wire::frame::Kind::Bytes,
            _ => gipc_wire::frame::Kind::Encoded,
        };
        (kind, Borrowed::to_owned(*o))
    } else if path.codecs == Codec::Raw {
        return Ok(Route::Python);
    } else {
        match dumps(py, path, o) {
            Ok(pickled) => (gipc_wire::frame::Kind::Encoded, pickled),
            Err(err) if err.is_instance(py, path.not_picklable.bind(py)) => {
                return Ok(Route::WithHandles)
            }
            Err(err) => return Err(err),
        }
    };
    // Looked at after pickling, as the Python code does (pickling may run any code).
    if path.lock.get().is_held() {
        return Ok(Route::Locked(kind, payload));
    }
    let progress = path
        .writer
        .bind(py)
        .try_borrow_mut()?
        .send(kind as u8, &payload)?;
    Ok(Route::Sent(progress))
}

/// `pickle.dumps(o, protocol)`. Through `PyObject_CallFunctionObjArgs`, which passes the
/// arguments on the C stack (vectorcall) where PyO3's `call1` builds a tuple in this build,
/// ~30 ns: the Python frame this module saves a put of a small dict.
fn dumps<'py>(
    py: Python<'py>,
    path: &PutPath,
    o: &Borrowed<'_, 'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    // SAFETY: three valid references (the GIL is held), then the null that ends the list;
    // the result is a new reference or null with an exception set.
    unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyObject_CallFunctionObjArgs(
                path.dumps.as_ptr(),
                o.as_ptr(),
                path.protocol.as_ptr(),
                std::ptr::null_mut::<ffi::PyObject>(),
            ),
        )
    }
}

/// `_GIPCWriter.put`, called by PyO3's fastcall trampoline.
///
/// # Safety
/// As for [`try_send`]; `slf` is a `_GIPCWriter` (CPython checks it).
unsafe fn put(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // One argument, `o`, by position or by name, as the Python method took it.
    // SAFETY: per this function's contract, `kwnames` is null or a tuple.
    let by_name = unsafe { Borrowed::from_ptr_or_opt(py, kwnames) };
    let named_o = match by_name {
        None => false,
        Some(names) => {
            let names = names.cast::<pyo3::types::PyTuple>()?;
            names.len() == 1 && names.get_item(0)?.eq("o")?
        }
    };
    if !matches!(
        (nargs, by_name.is_some(), named_o),
        (1, false, _) | (0, true, true)
    ) {
        return Err(PyTypeError::new_err("put() takes exactly one argument (o)"));
    }
    // SAFETY: per this function's contract, `slf` and the argument are valid borrowed
    // references for the duration of the call.
    let (handle, o) = unsafe { (Borrowed::from_ptr(py, slf), Borrowed::from_ptr(py, *args)) };
    let path = handle.getattr(pyo3::intern!(py, "_fast"))?;
    let path = path.cast::<PutPath>()?.get();
    let result = match route(py, path, &o)? {
        Route::Sent(Progress::Done) => return Ok(py.None().into_ptr()),
        Route::Sent(progress) => {
            handle.call_method1(pyo3::intern!(py, "_put_unfinished"), (progress as u8,))
        }
        Route::Locked(kind, payload) => {
            handle.call_method1(pyo3::intern!(py, "_put_locked"), (kind as u8, payload))
        }
        Route::Python => handle.call_method1(pyo3::intern!(py, "_put_python"), (o,)),
        Route::WithHandles => handle.call_method1(pyo3::intern!(py, "_put_with_handles"), (o,)),
    };
    Ok(result?.into_ptr())
}

/// What the reader handle's `get` needs, looked up once per handle (its `_get_path`
/// attribute): the common cases of `get` then run here, without a Python frame, and
/// everything else in the handle's own Python code.
#[pyclass(module = "gipc._core", frozen)]
pub struct GetPath {
    reader: Py<Reader>,
    /// The lock the handle holds while it does I/O.
    lock: Py<HandleLock>,
    /// The handle's backlog (messages of a batch not returned yet): a deque, never replaced.
    backlog: Py<PyAny>,
    decoder: Codec,
    /// Whether `KIND_BYTES` frames are accepted as they are (both ends use pickle).
    bytes_as_they_are: bool,
    /// `pickle.loads`.
    loads: Py<PyAny>,
}

#[pymethods]
impl GetPath {
    /// `decoder`: "pickle", "raw" or "other" (see `Codec`).
    #[new]
    fn new(
        reader: Py<Reader>,
        lock: Py<HandleLock>,
        backlog: Py<PyAny>,
        decoder: &str,
        bytes_as_they_are: bool,
        loads: Py<PyAny>,
    ) -> PyResult<Self> {
        let decoder = Codec::from_name(decoder, "decoder")?;
        Ok(GetPath {
            reader,
            lock,
            backlog,
            decoder,
            bytes_as_they_are,
            loads,
        })
    }

    /// What it holds, for the cycle collector: the handle's backlog can hold an error
    /// whose traceback holds the handle (`get_many` parks one at the end of a stream), a
    /// cycle through this object that the collector must see to free the handle. No
    /// `__clear__`: clearing the handle's `__dict__`, part of any such cycle, drops this.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.reader)?;
        visit.call(&self.lock)?;
        visit.call(&self.backlog)?;
        visit.call(&self.loads)
    }
}

/// `_GIPCReader.get`, called by PyO3's fastcall trampoline: with no timeout, no other
/// greenlet doing I/O on the handle and no backlog, one look at the descriptors, and the
/// message decoded here when pickle or no decoder does it; anything else in Python
/// (`_get_python`, `_decode`, `_get_waiting`), as the Python method did it.
///
/// # Safety
/// As for [`try_send`]; `slf` is a `_GIPCReader` (CPython checks it).
unsafe fn get(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // One optional argument, `timeout`, by position or by name, as the Python method took it.
    // SAFETY: per this function's contract, `kwnames` is null or a tuple.
    let by_name = unsafe { Borrowed::from_ptr_or_opt(py, kwnames) };
    // The errors Python gives for the method's signature, `get(self, timeout=None)`.
    if nargs > 1 {
        return Err(PyTypeError::new_err(format!(
            "get() takes from 1 to 2 positional arguments but {} were given",
            nargs + 1
        )));
    }
    let named = match by_name {
        None => 0,
        Some(names) => {
            let names = names.cast::<pyo3::types::PyTuple>()?;
            for name in names.iter() {
                if !name.eq("timeout")? {
                    return Err(PyTypeError::new_err(format!(
                        "get() got an unexpected keyword argument {}",
                        name.repr()?
                    )));
                }
            }
            if nargs + names.len() as ffi::Py_ssize_t > 1 {
                return Err(PyTypeError::new_err(
                    "get() got multiple values for argument 'timeout'",
                ));
            }
            names.len() as ffi::Py_ssize_t
        }
    };
    // SAFETY: per this function's contract, `slf` and the `nargs + named` arguments are
    // valid borrowed references for the duration of the call.
    let handle = unsafe { Borrowed::from_ptr(py, slf) };
    let timeout = if nargs + named == 1 {
        // SAFETY: as above: one argument, by position or by name, is there.
        Some(unsafe { Borrowed::from_ptr(py, *args) })
    } else {
        None
    };
    if let Some(timeout) = timeout.filter(|timeout| !timeout.is_none()) {
        let result = handle.call_method1(pyo3::intern!(py, "_get_python"), (timeout,))?;
        return Ok(result.into_ptr());
    }
    let path = handle.getattr(pyo3::intern!(py, "_get_path"))?;
    let path = path.cast::<GetPath>()?.get();
    if path.lock.get().is_held() || path.backlog.bind(py).is_truthy()? {
        let result = handle.call_method1(pyo3::intern!(py, "_get_python"), (py.None(),))?;
        return Ok(result.into_ptr());
    }
    let received = path.reader.bind(py).try_borrow_mut()?.receive(py)?;
    let result = match received {
        Some(Received::Message { kind, payload }) => match (kind, path.decoder) {
            (gipc_wire::frame::Kind::Encoded, Codec::Pickle) => loads(py, path, &payload)?,
            (gipc_wire::frame::Kind::Encoded, Codec::Raw) => payload.into_any().into_bound(py),
            (gipc_wire::frame::Kind::Bytes, _) if path.bytes_as_they_are => {
                payload.into_any().into_bound(py)
            }
            _ => {
                let frame = Received::Message { kind, payload }.into_python(py)?;
                handle.call_method1(pyo3::intern!(py, "_decode"), (frame,))?
            }
        },
        Some(handles @ Received::Handles { .. }) => {
            let frame = handles.into_python(py)?;
            handle.call_method1(pyo3::intern!(py, "_decode"), (frame,))?
        }
        Some(Received::Yield) => {
            handle.call_method1(pyo3::intern!(py, "_get_waiting"), (Progress::Yield as u8,))?
        }
        None => handle.call_method1(
            pyo3::intern!(py, "_get_waiting"),
            (Progress::WouldBlock as u8,),
        )?,
    };
    Ok(result.into_ptr())
}

/// `pickle.loads(payload)`, the arguments on the C stack (see [`dumps`]).
fn loads<'py>(
    py: Python<'py>,
    path: &GetPath,
    payload: &Py<pyo3::types::PyBytes>,
) -> PyResult<Bound<'py, PyAny>> {
    // SAFETY: two valid references (the GIL is held), then the null that ends the list;
    // the result is a new reference or null with an exception set.
    unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyObject_CallFunctionObjArgs(
                path.loads.as_ptr(),
                payload.as_ptr(),
                std::ptr::null_mut::<ffi::PyObject>(),
            ),
        )
    }
}

/// A method definition that CPython calls with the fastcall convention, never freed: it
/// must outlive the class it is put in.
fn fastcall_def(
    name: &'static std::ffi::CStr,
    doc: *const std::os::raw::c_char,
    trampoline: unsafe extern "C" fn(
        *mut ffi::PyObject,
        *const *mut ffi::PyObject,
        ffi::Py_ssize_t,
        *mut ffi::PyObject,
    ) -> *mut ffi::PyObject,
) -> *mut ffi::PyMethodDef {
    Box::into_raw(Box::new(ffi::PyMethodDef {
        ml_name: name.as_ptr(),
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
        ml_doc: doc,
    }))
}

/// Puts a method made from `def` into `class` under `name`.
fn set_method(class: &Bound<'_, PyType>, name: &str, def: *mut ffi::PyMethodDef) -> PyResult<()> {
    // SAFETY: a valid type object and a method definition that lives forever; the result is
    // a new reference or null with an exception set.
    let descriptor = unsafe {
        Bound::from_owned_ptr_or_err(
            class.py(),
            ffi::PyDescr_NewMethod(class.as_ptr().cast(), def),
        )?
    };
    class.setattr(name, descriptor)
}

/// Replaces `put` of the Python writer class (`gipc._handles._GIPCWriter`) with the one
/// above, keeping its docstring. Its instances must have `_fast` (a `PutPath`),
/// `_put_python`, `_put_unfinished` and `_put_with_handles`.
#[pyfunction]
pub fn install_put(class: &Bound<'_, PyType>) -> PyResult<()> {
    let doc: Option<String> = class.getattr("put")?.getattr("__doc__")?.extract()?;
    // The first lines give `inspect.signature` the method's signature.
    let doc = format!("put($self, o)\n--\n\n{}", doc.unwrap_or_default());
    let doc =
        std::ffi::CString::new(doc).map_err(|_| PyValueError::new_err("a docstring with a NUL"))?;
    let trampoline = pyo3::get_trampoline_function!(fastcall_cfunction_with_keywords, put);
    set_method(
        class,
        "put",
        fastcall_def(c"put", doc.into_raw(), trampoline),
    )
}

/// Replaces `get` of the Python reader class (`gipc._handles._GIPCReader`) with the one
/// above, keeping its docstring. Its instances must have `_get_path` (a `GetPath`),
/// `_get_python`, `_get_waiting` and `_decode`.
#[pyfunction]
pub fn install_get(class: &Bound<'_, PyType>) -> PyResult<()> {
    let doc: Option<String> = class.getattr("get")?.getattr("__doc__")?.extract()?;
    let doc = format!(
        "get($self, timeout=None)\n--\n\n{}",
        doc.unwrap_or_default()
    );
    let doc =
        std::ffi::CString::new(doc).map_err(|_| PyValueError::new_err("a docstring with a NUL"))?;
    let trampoline = pyo3::get_trampoline_function!(fastcall_cfunction_with_keywords, get);
    set_method(
        class,
        "get",
        fastcall_def(c"get", doc.into_raw(), trampoline),
    )
}
