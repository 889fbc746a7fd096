//! `gipc._core`: the extension module. It only exports; see `handle.rs` for the classes and
//! the `gipc-wire` crate for the framing and I/O they drive.

mod buffer;
mod claims;
mod errors;
mod fastcall;
mod handle;
mod lock;
mod records;
mod signals;
mod start_fds;

use gipc_wire::send::Progress;
use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<handle::Reader>()?;
    m.add_class::<handle::Writer>()?;
    m.add_class::<claims::ClaimWord>()?;
    m.add_class::<lock::HandleLock>()?;
    m.add_class::<start_fds::StartFds>()?;
    m.add_class::<signals::AllSignalsBlocked>()?;
    fastcall::install(&m.py().get_type::<handle::Writer>())?;
    m.add_function(wrap_pyfunction!(handle::channel, m)?)?;
    m.add_function(wrap_pyfunction!(handle::reader_from_fds, m)?)?;
    m.add_function(wrap_pyfunction!(handle::writer_from_fds, m)?)?;
    m.add_function(wrap_pyfunction!(signals::reset_signal_state, m)?)?;
    m.add_function(wrap_pyfunction!(records::send_record, m)?)?;
    m.add_function(wrap_pyfunction!(records::recv_record, m)?)?;
    m.add_class::<fastcall::PutPath>()?;
    m.add_function(wrap_pyfunction!(fastcall::install_put, m)?)?;
    m.add_class::<fastcall::GetPath>()?;
    m.add_function(wrap_pyfunction!(fastcall::install_get, m)?)?;
    m.add("DONE", Progress::Done as u8)?;
    m.add("WOULD_BLOCK", Progress::WouldBlock as u8)?;
    m.add("YIELD", Progress::Yield as u8)?;
    m.add("KIND_ENCODED", gipc_wire::frame::Kind::Encoded as u8)?;
    m.add("KIND_BYTES", gipc_wire::frame::Kind::Bytes as u8)?;
    m.add("KIND_BATCH", gipc_wire::frame::Kind::Batch as u8)?;
    m.add("KIND_HANDLES", gipc_wire::frame::Kind::Handles as u8)?;
    m.add(
        "REPLY_SPIN_US",
        gipc_wire::spin::REPLY_SPIN.as_micros() as u64,
    )?;
    m.add("BULK_MIN", gipc_wire::io::BULK_MIN)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
