//! No zombies and no strays (issue 4): 200 workers killed one after another are each reaped
//! before their room hears of it, and `kill -9` of the gateway takes every worker down within
//! a second, even one stuck in a busy JavaScript loop.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{is_alive, kill9, process, workers_of, zombies_of, Gateway};
use nix::sys::signal::Signal;
use serde_json::json;

/// 200 kills over 50 rooms: 4 per room, under the default crash-loop guard (more than 5 in
/// 10 s), so every kill is followed by a real restart.
const KILLS: usize = 200;
const ROOMS: usize = 50;

fn topic(room: usize) -> String {
    format!("room:z{room}")
}

#[tokio::test]
async fn two_hundred_killed_workers_are_all_reaped_and_leave_no_zombies() {
    let started = Instant::now();
    // One socket does all the talking, faster than the default inbound rate.
    let gateway = Gateway::start(&[
        "--rate-per-sec",
        "100000",
        "--rate-burst",
        "100000",
        "--max-rooms-started-per-socket",
        "1000",
    ]);
    let gateway_pid = gateway.pid();
    let mut client = gateway.connect().await;
    let mut join_refs = Vec::new();
    for room in 0..ROOMS {
        join_refs.push(client.join_ok(&topic(room)).await.0);
    }
    let mut killed = BTreeSet::new();
    for kill in 0..KILLS {
        let room = kill % ROOMS;
        let (id, topic) = (format!("z{room}"), topic(room));
        let pid = gateway.wait_room_pid(&id);
        assert!(is_alive(pid), "kill {kill}: room {id}'s worker {pid} is not running");
        kill9(pid);

        // The room hears of it only once the worker is reaped and out of the registry.
        let reset = client.recv_until(|f| f[3] == "room_reset" && f[2] == *topic).await;
        assert_eq!(reset[4]["reason"], "room worker exited", "{reset}");
        let detail = reset[4]["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("SIGKILL") || detail.contains("signal: 9"), "kill {kill}: {reset}");
        if let Some(left) = process(pid).filter(|p| p.ppid == gateway_pid) {
            panic!("kill {kill}: worker {pid} is still the gateway's child after room_reset: {left:?}");
        }
        assert_ne!(gateway.room_pid(&id), Some(pid), "kill {kill}: /api/rooms still lists {pid}");
        let zombies = zombies_of(gateway_pid);
        assert!(zombies.is_empty(), "kill {kill}: defunct children of the gateway: {zombies:?}");

        // The next message starts a fresh runtime: ids start at 1 again.
        let reply = client.send_message(&join_refs[room], &topic, "zed", "after the kill").await;
        assert_eq!(reply["status"], "ok", "kill {kill}: {reply}");
        assert_eq!(reply["response"]["id"], 1, "kill {kill}: not a fresh runtime: {reply}");
        killed.insert(pid);
    }
    assert_eq!(killed.len(), KILLS, "every kill hit a different worker");
    assert!(!gateway.log_contains_now("refusing it for"), "the crash-loop guard tripped");

    // The process table: no defunct children, and the gateway's workers are exactly the live
    // rooms' workers.
    let zombies = zombies_of(gateway_pid);
    assert!(zombies.is_empty(), "defunct children of the gateway: {zombies:?}");
    let listed: BTreeSet<u32> =
        gateway.rooms().iter().filter_map(|r| r["pid"].as_u64()).map(|p| p as u32).collect();
    assert_eq!(listed.len(), ROOMS, "one live worker per room");
    let workers: BTreeSet<u32> = workers_of(gateway_pid).iter().map(|p| p.pid).collect();
    assert_eq!(workers, listed, "worker processes that /api/rooms does not list, or the reverse");
    let pool: BTreeSet<u32> = common::pool_of(gateway_pid).iter().map(|p| p.pid).collect();
    let others: Vec<_> = common::children_of(gateway_pid)
        .into_iter()
        .filter(|p| !listed.contains(&p.pid) && !pool.contains(&p.pid))
        .collect();
    assert!(
        others.is_empty(),
        "children of the gateway besides the live workers and the warm pool: {others:?}"
    );
    assert!(killed.is_disjoint(&workers), "a killed worker is still a child");
    println!("zombies: {KILLS} workers killed and reaped in {:.1?}", started.elapsed());
}

#[tokio::test]
async fn kill_9_of_the_gateway_takes_every_worker_down_within_a_second() {
    // The chat script, with a message that never finishes: that worker is busy in JS and not
    // reading its stdin when the gateway dies, so only PR_SET_PDEATHSIG can stop it.
    let mut gateway = common::start_with_spinning_chat();
    let mut client = gateway.connect().await;
    let mut join_refs = Vec::new();
    for room in 0..10 {
        let topic = format!("room:k{room}");
        let (join_ref, _) = client.join_ok(&topic).await;
        let reply = client.send_message(&join_ref, &topic, "kay", "hello").await;
        assert_eq!(reply["status"], "ok", "{reply}");
        join_refs.push(join_ref);
    }
    let pids: BTreeSet<u32> = (0..10).map(|room| gateway.wait_room_pid(&format!("k{room}"))).collect();
    let workers: BTreeSet<u32> = workers_of(gateway.pid()).iter().map(|p| p.pid).collect();
    assert_eq!(workers, pids, "the workers are the ten rooms'");

    // Room k0 spins; wait until its worker is on the CPU.
    let spinner = gateway.wait_room_pid("k0");
    client
        .push(Some(&join_refs[0]), "room:k0", "send_message", json!({"sender": "kay", "text": "spin"}))
        .await;
    common::wait_for(|| process(spinner).filter(|p| p.state == 'R').map(|_| ()))
        .unwrap_or_else(|| panic!("worker {spinner} never started spinning: {:?}", process(spinner)));

    let killed_at = Instant::now();
    gateway.signal(Signal::SIGKILL);
    let gone = common::wait_for_within(Duration::from_secs(1), || {
        pids.iter().all(|pid| !is_alive(*pid)).then(|| killed_at.elapsed())
    });
    let survivors: Vec<_> =
        pids.iter().filter(|pid| is_alive(**pid)).filter_map(|pid| process(*pid)).collect();
    let took = gone.unwrap_or_else(|| panic!("workers outlived the gateway by more than 1 s: {survivors:?}"));
    println!("zombies: all 10 workers (one busy in JS) gone {took:.1?} after kill -9 of the gateway");
    gateway.wait_exit(Duration::from_secs(5));
}
