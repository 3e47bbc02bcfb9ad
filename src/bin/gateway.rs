//! The gateway: HTTP, WebSocket (Phoenix Channels v2), PubSub and the room supervisor.
//!
//! When no `room-worker` binary sits beside it, the gateway starts copies of itself with
//! argv[0] set to `room-worker`; those run the worker instead.
fn main() -> std::process::ExitCode {
    if roomvisor::wire::invoked_as_worker() {
        return roomvisor::worker::main();
    }
    roomvisor::gateway::main()
}
