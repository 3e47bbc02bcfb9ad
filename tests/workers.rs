//! Workers that break the IPC contract (the design's gateway-worker IPC, section 3): garbage on
//! their channel (the socket that is their fd 0), a frame over the IPC limit, a reply to a call never made, an exit at start-up. Each
//! such worker is a shell script standing in for `room-worker` for one start; every other start
//! runs the real worker, so the tests also show that nothing else is affected and that the room
//! comes back.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Gateway;
use roomvisor::wire::{self, FromWorker};
use serde_json::json;

/// A stand-in `room-worker`: the `bad_start`-th start (1-based) writes `stdout_bytes` to its
/// channel (fd 0, a socket: written as well as read) and then ignores its input (or exits at once with `exit_now`); every other start execs the real worker.
struct FakeWorker {
    dir: PathBuf,
}

impl FakeWorker {
    fn new(bad_start: u32, stdout_bytes: &[u8], exit_now: bool) -> FakeWorker {
        let dir = common::script_file("unused", "").parent().expect("a temp dir").to_path_buf();
        std::fs::write(dir.join("stdout.bin"), stdout_bytes).expect("write the fake's output");
        let then = if exit_now { "exit 3" } else { "exec sleep 60" };
        let script = format!(
            "#!/bin/sh\n\
             dir='{dir}'\n\
             echo start >> \"$dir/starts\"\n\
             if [ \"$(wc -l < \"$dir/starts\")\" -eq {bad_start} ]; then\n\
               echo $$ > \"$dir/pid\"\n\
               cat \"$dir/stdout.bin\" >&0\n\
               {then}\n\
             fi\n\
             exec '{real}'\n",
            dir = dir.display(),
            real = env!("CARGO_BIN_EXE_room-worker"),
        );
        let path = dir.join("room-worker");
        std::fs::write(&path, script).expect("write the fake worker");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("make it executable");
        FakeWorker { dir }
    }

    fn path(&self) -> &Path {
        &self.dir
    }

    fn gateway(&self, extra: &[&str]) -> Gateway {
        let bin = self.dir.join("room-worker");
        let bin = bin.to_str().expect("a UTF-8 temp path");
        // No warm pool: the fake counts exec'd starts as room starts, which only holds when
        // every room execs its own worker (tests/warm.rs covers the pool).
        let mut args = vec!["--worker-bin", bin, "--warm-workers", "0"];
        args.extend_from_slice(extra);
        Gateway::start(&args)
    }

    fn starts(&self) -> usize {
        std::fs::read_to_string(self.dir.join("starts")).map(|s| s.lines().count()).unwrap_or(0)
    }

    fn bad_pid(&self) -> u32 {
        common::wait_for(|| std::fs::read_to_string(self.path().join("pid")).ok()?.trim().parse().ok())
            .expect("the misbehaving start ran")
    }
}

fn framed(frames: &[FromWorker]) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in frames {
        let body = wire::encode(frame).expect("encode a frame");
        out.extend_from_slice(&u32::try_from(body.len()).expect("small frame").to_be_bytes());
        out.extend_from_slice(&body);
    }
    out
}

/// A bystander room on a real worker, a misbehaving start for `room:bad`, then: the bad worker
/// is dead and reaped, the log says why, the bystander kept its worker and state, and `room:bad`
/// works on the next join.
async fn misbehaving_start_is_contained(fake: FakeWorker, expected_log: &str) {
    let gateway = fake.gateway(&[]);
    let mut bystander = gateway.connect().await;
    let (by_ref, _) = bystander.join_ok("room:bystander").await;
    bystander.send_message(&by_ref, "room:bystander", "ann", "before").await;
    let bystander_pid = gateway.wait_room_pid("bystander");

    let mut client = gateway.connect().await;
    let (_, reply) = client.join("room:bad").await;
    assert_eq!(reply, json!({"status": "error", "response": {"reason": "room worker exited"}}));
    let bad_pid = fake.bad_pid();
    assert!(gateway.log_contains(expected_log), "the log does not say {expected_log:?}");
    common::wait_for(|| (!common::is_alive(bad_pid) && common::process(bad_pid).is_none()).then_some(()))
        .expect("the misbehaving worker is killed and reaped");

    assert_eq!(gateway.room_pid("bystander"), Some(bystander_pid));
    let sent = bystander.send_message(&by_ref, "room:bystander", "ann", "after").await;
    assert_eq!(sent["status"], "ok");
    assert_eq!(sent["response"]["id"], 2, "the bystander room kept its state");

    let (bad_ref, history) = client.join_ok("room:bad").await;
    assert!(history.is_empty());
    let sent = client.send_message(&bad_ref, "room:bad", "bob", "fresh").await;
    assert_eq!(sent["status"], "ok");
    assert_eq!(fake.starts(), 3);
}

#[tokio::test]
async fn a_worker_writing_garbage_is_killed_as_a_protocol_violation() {
    // A plausible length and then bytes that are no frame at all.
    let garbage = [0, 0, 0, 6, 0xff, 0xfe, b'h', b'e', b'l', b'p'];
    misbehaving_start_is_contained(FakeWorker::new(2, &garbage, false), "protocol violation: ").await;
}

#[tokio::test]
async fn a_worker_sending_a_frame_over_the_ipc_limit_is_killed() {
    // Only the length prefix is needed: the gateway refuses the frame before reading its body.
    let header = (9u32 * 1024 * 1024).to_be_bytes();
    misbehaving_start_is_contained(FakeWorker::new(2, &header, false), "frame size too big").await;
}

#[tokio::test]
async fn a_worker_answering_a_call_never_made_is_killed() {
    let frames = framed(&[FromWorker::Ready, FromWorker::Reply { id: 777, result: Ok("null".to_owned()) }]);
    misbehaving_start_is_contained(
        FakeWorker::new(2, &frames, false),
        "protocol violation: a reply to unknown call 777",
    )
    .await;
}

#[tokio::test]
async fn a_room_whose_worker_exits_at_start_up_is_not_respawned_in_a_loop() {
    // Every start fails: the first start is this test's bystander-free room.
    let fake = FakeWorker::new(0, b"", true);
    std::fs::write(
        fake.path().join("room-worker"),
        "#!/bin/sh\necho start >> \"$(dirname \"$0\")/starts\"\nexit 3\n",
    )
    .expect("rewrite the fake");
    let gateway = fake.gateway(&["--crash-limit", "5", "--crash-window-ms", "10000"]);
    let mut client = gateway.connect().await;
    let mut reasons = Vec::new();
    for _ in 0..12 {
        let (_, reply) = client.join("room:doomed").await;
        assert_eq!(reply["status"], "error");
        reasons.push(reply["response"]["reason"].as_str().expect("a reason").to_owned());
    }
    // Six failed starts exceed the limit of five; after that the room is refused unstarted.
    assert_eq!(fake.starts(), 6, "reasons: {reasons:?}");
    assert!(reasons[..6].iter().all(|r| r == "room worker exited"), "{reasons:?}");
    assert!(reasons[6..].iter().all(|r| r == "room is crash-looping"), "{reasons:?}");
    assert!(gateway.log_contains("room crashed more than 5 times"));
    // The gateway itself is fine, and no failed start left a zombie behind.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let zombies: Vec<u32> =
        common::children_of(gateway.pid()).iter().filter(|p| p.state == 'Z').map(|p| p.pid).collect();
    assert!(zombies.is_empty(), "zombies: {zombies:?}");
    assert_eq!(gateway.get_json("/healthz")["status"], "ok");
}

#[tokio::test]
async fn a_worker_that_never_reads_its_stdin_is_killed_at_the_hard_timeout() {
    // Ready, then deaf: every call is left unanswered.
    let fake = FakeWorker::new(1, &framed(&[FromWorker::Ready]), false);
    let gateway = fake.gateway(&["--call-timeout-ms", "300", "--hard-timeout-ms", "1500"]);
    let mut client = gateway.connect().await;
    let (_, reply) = client.join("room:deaf").await;
    assert_eq!(reply, json!({"status": "error", "response": {"reason": "timeout"}}));
    let deaf_pid = fake.bad_pid();
    assert!(gateway.log_contains("unresponsive past the hard timeout"));
    common::wait_for(|| common::process(deaf_pid).is_none().then_some(())).expect("killed and reaped");
    // The next join runs the real worker.
    let (join_ref, _) = client.join_ok("room:deaf").await;
    assert_eq!(client.send_message(&join_ref, "room:deaf", "ann", "hi").await["status"], "ok");
}

#[tokio::test]
async fn sigterm_with_a_deaf_worker_and_a_silent_client_still_exits_0_within_5_s() {
    // Ready, then deaf to everything, the Shutdown frame included; the hard timeout is far
    // off, so only the shutdown grace can end it.
    let fake = FakeWorker::new(1, &framed(&[FromWorker::Ready]), false);
    let mut gateway = fake.gateway(&[
        "--call-timeout-ms",
        "300",
        "--hard-timeout-ms",
        "60000",
        "--shutdown-grace-ms",
        "4500",
    ]);
    let mut client = gateway.connect().await;
    let (_, reply) = client.join("room:deaf").await;
    assert_eq!(reply["response"]["reason"], "timeout");
    let deaf_pid = fake.bad_pid();
    // The client never reads again, so it never answers the server's close frame either.
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        gateway.wait_exit(Duration::from_secs(5)),
        Some(0),
        "sockets and workers are shut down side by side, within the 4.5 s grace"
    );
    assert!(gateway.log_contains("still running after"), "the deaf worker was killed at the grace");
    assert!(common::process(deaf_pid).is_none(), "the deaf worker was reaped");
    drop(client);
}
