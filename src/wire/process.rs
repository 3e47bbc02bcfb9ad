//! The contract between the gateway and the worker process it starts, beyond the frames:
//! the name a worker runs under, what its environment carries, and the frame size cap both
//! sides start with.

/// The name a worker runs under, in `ps` and as argv[0] when the gateway starts a copy of
/// itself as the worker.
pub const WORKER_ARGV0: &str = "room-worker";

/// The gateway passes its pid so that a worker whose gateway died before `PR_SET_PDEATHSIG`
/// took effect notices and exits instead of running on as an orphan.
pub const PARENT_PID_ENV: &str = "ROOMVISOR_GATEWAY_PID";

/// Frames over this size are a protocol violation (the default of the
/// `--max-ipc-frame-bytes` limit); the worker reads its first frames under this cap, before
/// it learns the configured one.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;

/// True when this executable was started as a room worker (the gateway's fallback when no
/// `room-worker` binary sits beside it).
pub fn invoked_as_worker() -> bool {
    std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n == WORKER_ARGV0))
        .unwrap_or(false)
}
