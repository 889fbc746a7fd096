//! Pipe writes without readers under every SIGPIPE disposition, with the kernel's
//! `RWF_NOSIGNAL` where it has it (Linux 6.18 and later). One test per file: the disposition
//! is process-wide.

mod sigpipe_scenarios;

#[test]
fn a_pipe_without_readers_is_epipe_under_every_disposition() {
    sigpipe_scenarios::run_all();
}
