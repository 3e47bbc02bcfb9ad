//! Open-file descriptors as a budget. A room costs the gateway one (its socket pair's end),
//! a client socket one; starting a worker needs a few more for a moment (the pair, `/dev/null`,
//! the exec status pipe). Rooms are refused while enough is left for sockets, `/healthz` and
//! the admin API to keep working, instead of failing somewhere at `EMFILE`.

use std::sync::OnceLock;

/// Descriptors no room start may take: left for sockets, health checks, the admin API, the
/// store, NATS and the listener's accept loop.
pub const ROOM_RESERVE: u64 = 128;
/// What one worker start holds at its peak, beside the gateway's end it keeps.
const SPAWN_PEAK: u64 = 5;

static LIMIT: OnceLock<u64> = OnceLock::new();

/// Raises the soft limit on open descriptors to the hard limit (a socket is a descriptor, and
/// so is each room; the usual soft limit of 1,024 would cap the gateway far below what it can
/// serve), logs both, and returns the limit now in force.
pub fn raise_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let limit = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::info!("open files: soft limit raised from {soft} to the hard limit, {hard}");
                hard
            }
            Err(e) => {
                tracing::warn!("cannot raise the open-files limit from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, hard)) => {
            tracing::info!("open files: soft limit {soft}, hard limit {hard}");
            soft
        }
        Err(e) => {
            tracing::warn!("cannot read the open-files limit: {e}");
            1024
        }
    };
    let _ = LIMIT.set(limit);
    limit
}

/// The limit in force, as [`raise_limit`] left it (read now if it has not run: tests).
fn limit() -> u64 {
    *LIMIT.get_or_init(|| {
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024)
    })
}

/// Descriptors open in this process now.
fn in_use() -> u64 {
    std::fs::read_dir("/proc/self/fd").map(|fds| fds.count() as u64).unwrap_or(0)
}

/// Whether one more room fits, `live_workers` running: counted exactly (a look at
/// `/proc/self/fd`) only once the workers alone take half of what rooms may use, so that
/// starts stay cheap far from the limit.
pub fn room_fits(live_workers: usize) -> Result<(), String> {
    let usable = limit().saturating_sub(ROOM_RESERVE + SPAWN_PEAK);
    if (live_workers as u64) < usable / 2 {
        return Ok(());
    }
    let open = in_use();
    if open < usable {
        Ok(())
    } else {
        Err(format!("{open} of {} open files in use, {ROOM_RESERVE} kept for sockets and operators", limit()))
    }
}
