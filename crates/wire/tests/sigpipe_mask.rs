//! The same scenarios as `sigpipe.rs`, without the kernel flag: the writer blocks SIGPIPE in
//! its thread while it writes (what older kernels and other systems get).

mod sigpipe_scenarios;

#[test]
fn a_pipe_without_readers_is_epipe_under_every_disposition_without_the_kernel_flag() {
    // Read at the first pipe write, which is still to come in this process.
    std::env::set_var("GIPC_PIPE_NOSIGNAL", "0");
    sigpipe_scenarios::run_all();
}
