//! A room's runtime process; the gateway starts one per live room.
fn main() -> std::process::ExitCode {
    roomvisor::worker::main()
}
