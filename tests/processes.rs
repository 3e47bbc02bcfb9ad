//! Process lifecycle: no room-worker outlives its gateway, and the fallback worker mode.

mod common;

use std::time::{Duration, Instant};

use common::{is_alive, workers_of, Gateway};
use nix::sys::signal::Signal;
use serde_json::json;

/// Starts two rooms and returns their worker pids.
async fn two_rooms(gateway: &Gateway) -> (common::Client, Vec<u32>) {
    let mut client = gateway.connect().await;
    client.join_ok("room:one").await;
    client.join_ok("room:two").await;
    let pids = vec![gateway.wait_room_pid("one"), gateway.wait_room_pid("two")];
    assert!(pids.iter().all(|p| is_alive(*p)));
    (client, pids)
}

fn assert_all_gone(pids: &[u32], within: Duration) {
    let deadline = Instant::now() + within;
    while pids.iter().any(|p| is_alive(*p)) {
        if Instant::now() >= deadline {
            let survivors: Vec<_> = pids.iter().filter_map(|p| common::process(*p)).collect();
            // Orphans now: nothing else would ever stop them.
            for survivor in &survivors {
                common::try_kill9(survivor.pid);
            }
            panic!("room workers outlived the gateway: {survivors:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn sigterm_closes_sockets_with_1001_stops_workers_and_exits_0() {
    let mut gateway = Gateway::start(&[]);
    let (mut client, pids) = two_rooms(&gateway).await;
    gateway.signal(Signal::SIGTERM);
    assert_eq!(client.closed().await, Some(1001));
    assert_eq!(
        gateway.wait_exit(Duration::from_secs(5)),
        Some(0),
        "supervision contract (design section 4): exit 0 within 5 s"
    );
    assert_all_gone(&pids, Duration::from_secs(1));
    assert!(gateway.log_contains("shut down on request"), "workers were asked, not killed");
    assert!(gateway.log_lacks_after_exit("worker stderr"), "a clean shutdown prints no worker errors");
}

#[tokio::test]
async fn sigint_is_a_graceful_shutdown_too() {
    let mut gateway = Gateway::start(&[]);
    let (_client, pids) = two_rooms(&gateway).await;
    gateway.signal(Signal::SIGINT);
    assert_eq!(
        gateway.wait_exit(Duration::from_secs(5)),
        Some(0),
        "supervision contract (design section 4): exit 0 within 5 s"
    );
    assert_all_gone(&pids, Duration::from_secs(1));
}

#[tokio::test]
async fn sigkill_of_the_gateway_takes_its_workers_down() {
    // An idle worker also exits when its stdin closes with the gateway; one busy in JS never
    // reads stdin again, so only PR_SET_PDEATHSIG can stop it. Room one spins, with CPU and
    // call limits far past the test's length.
    let mut gateway = common::start_with_spinning_chat();
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join_ok("room:one").await;
    client.join_ok("room:two").await;
    let pids = vec![gateway.wait_room_pid("one"), gateway.wait_room_pid("two")];
    client.push(Some(&join_ref), "room:one", "send_message", json!({"sender": "kay", "text": "spin"})).await;
    let spinner = pids[0];
    common::wait_for(|| common::process(spinner).filter(|p| p.state == 'R').map(|_| ()))
        .unwrap_or_else(|| panic!("worker {spinner} never started spinning: {:?}", common::process(spinner)));

    gateway.signal(Signal::SIGKILL);
    gateway.wait_exit(Duration::from_secs(5));
    // PR_SET_PDEATHSIG kills them; nothing is left running as an orphan.
    assert_all_gone(&pids, Duration::from_secs(1));
}

#[tokio::test]
async fn without_a_room_worker_binary_the_gateway_runs_itself_as_the_worker() {
    // A directory holding only the gateway, as after `cargo run --bin gateway`.
    let dir = std::env::temp_dir().join(format!("roomvisor-fallback-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lone = dir.join("gateway");
    std::fs::copy(env!("CARGO_BIN_EXE_gateway"), &lone).unwrap();
    assert!(!dir.join("room-worker").exists());

    let gateway = Gateway::start_binary(&lone, &[]);
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join_ok("room:fallback").await;
    let reply = client.send_message(&join_ref, "room:fallback", "ann", "hi").await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let pid = gateway.wait_room_pid("fallback");
    let workers = workers_of(gateway.pid());
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert_eq!(workers[0].pid, pid);
    assert_eq!(workers[0].argv0, "room-worker", "ps shows it as a room worker");
    // The kernel would name it after the executable; the worker renames itself (prctl) once
    // it runs a room, so `ps -e` and workers_of (which also sees its zombie, whose argv[0]
    // is gone) know it as a room worker whichever binary it is.
    assert_eq!(workers[0].comm, "room-worker", "comm names the role, not the executable");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, lone, "the worker is the gateway executable itself");
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn killed_workers_leave_no_zombies() {
    let gateway = Gateway::start(&[]);
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join_ok("room:reaped").await;
    for _ in 0..5 {
        let pid = gateway.wait_room_pid("reaped");
        common::kill9(pid);
        client.next_event("room_reset").await;
        common::wait_for(|| (!workers_of(gateway.pid()).iter().any(|p| p.pid == pid)).then_some(()))
            .unwrap_or_else(|| panic!("worker {pid} was not reaped"));
        let reply = client.send_message(&join_ref, "room:reaped", "ann", "again").await;
        assert_eq!(reply["status"], "ok", "{reply}");
    }
    let zombies: Vec<_> = common::children_of(gateway.pid()).into_iter().filter(|p| p.state == 'Z').collect();
    assert!(zombies.is_empty(), "{zombies:?}");
}

#[test]
fn stat_lines_with_odd_command_names_parse() {
    let parse = common::parse_stat;
    assert_eq!(parse("42 (room-worker) Z 7 42 42 0 -1"), Some(("room-worker".to_owned(), 'Z', 7)));
    assert_eq!(parse("42 (a) b (c)) S 7 42 42 0 -1"), Some(("a) b (c)".to_owned(), 'S', 7)));
    assert_eq!(parse("42 () R 1 0"), Some((String::new(), 'R', 1)));
    assert_eq!(parse("42 (x"), None);
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|fds| fds.count()).unwrap_or(0)
}

/// Each room costs the gateway one descriptor: the socket pair's end that carries its frames
/// both ways (three pipes used to; descriptors, not memory, capped the rooms a gateway held).
#[tokio::test]
async fn each_room_costs_the_gateway_one_descriptor() {
    let gateway = Gateway::start(&["--max-rooms-started-per-socket", "100"]);
    let mut client = gateway.connect().await;
    // The first room brings one-time descriptors of its own (the child reaper's, say).
    client.join_ok("room:warm-up").await;
    let before = open_descriptors(gateway.pid());
    for n in 0..40 {
        client.join_ok(&format!("room:fd-{n}")).await;
    }
    assert_eq!(common::workers_of(gateway.pid()).len(), 41);
    let after = open_descriptors(gateway.pid());
    assert_eq!(after - before, 40, "descriptors: {before} before 40 rooms, {after} after");
    // A worker holds its end of the pair, the gateway's stderr, and nothing else.
    let worker = common::workers_of(gateway.pid())[0].pid;
    let target = |fd: &str| std::fs::read_link(format!("/proc/{worker}/fd/{fd}")).ok();
    let (channel, stderr) = (target("0").expect("fd 0"), target("2").expect("fd 2"));
    assert!(channel.to_string_lossy().starts_with("socket:"), "{channel:?}");
    for entry in std::fs::read_dir(format!("/proc/{worker}/fd")).unwrap() {
        let fd = entry.unwrap().file_name().into_string().unwrap();
        let held = target(&fd).expect("a descriptor's target");
        assert!(held == channel || held == stderr, "worker fd {fd} is {held:?}");
    }
}

/// Under a low open-files limit the gateway starts rooms until only its reserve is left, then
/// refuses the next ones with a clear reason, while sockets, `/healthz`, the admin API and the
/// rooms already running keep working.
#[tokio::test]
async fn rooms_are_refused_before_the_descriptors_run_out() {
    let wrapper = common::script_file(
        "limited-gateway.sh",
        &format!("#!/bin/sh\nulimit -n 400\nexec '{}' \"$@\"\n", env!("CARGO_BIN_EXE_gateway")),
    );
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let flags =
        ["--max-rooms-started-per-socket", "1000", "--rate-per-sec", "10000", "--rate-burst", "10000"];
    let gateway = Gateway::start_binary(&wrapper, &flags);
    let mut client = gateway.connect().await;
    let (first_ref, _) = client.join_ok("room:kept").await;
    let mut started = 1;
    let refusal = loop {
        let topic = format!("room:many-{started}");
        let (join_ref, reply) = client.join(&topic).await;
        if reply["status"] != "ok" {
            break reply;
        }
        started += 1;
        let msg_ref = client.push(Some(&join_ref), &topic, "phx_leave", json!({})).await;
        client.reply_to(&msg_ref).await;
        assert!(started < 400, "rooms kept starting past the open-files limit");
    };
    assert_eq!(refusal["response"]["reason"], "room unavailable: the server is at capacity", "{refusal}");
    assert!(started > 150, "only {started} rooms under a limit of 400");
    assert!(gateway.log_contains("kept for sockets and operators"), "the log gives the figures");
    // What runs keeps working, and so do new sockets and the operators' endpoints.
    let sent = client.send_message(&first_ref, "room:kept", "ann", "still here").await;
    assert_eq!(sent["status"], "ok", "{sent}");
    let health = gateway.get_json("/healthz");
    assert_eq!(health["rooms"], started, "{health}");
    let (status, _) = common::http_get(gateway.addr, "/api/admin/rooms", &[]);
    assert_eq!(status, 200);
    let mut late = gateway.connect().await;
    late.join_ok("room:kept").await;
}
