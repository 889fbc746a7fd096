//! gipc's transport core, free of Python: the wire format, non-blocking framed reads and
//! writes, and descriptor set-up. The extension module (`gipc._core`) binds it to Python.
//!
//! Nothing in this crate ever waits: every call either makes progress or says "would block",
//! and the caller waits on gevent's hub. (The one thread it may start, to read a large
//! payload aside from the event loop, waits on its own: see `aside`.)

pub mod aside;
pub mod budget;
pub mod claims;
pub mod frame;
pub mod growth;
pub mod io;
pub mod memory;
pub mod recv;
pub mod send;
pub mod sigpipe;
pub mod spin;

#[cfg(test)]
mod testing;
