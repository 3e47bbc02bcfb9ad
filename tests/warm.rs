//! The warm pool (`--warm-workers`, issue 15): prepared workers that are not rooms until one
//! is asked for, forked by a template as children of the gateway, replaced when they die,
//! and gone with the gateway.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{children_of, is_alive, kill9, process, zombies_of, Gateway, ProcessInfo};
use common::{SPARE_COMM as SPARE, TEMPLATE_COMM as TEMPLATE};

fn with_comm(gateway: &Gateway, comm: &str) -> Vec<ProcessInfo> {
    children_of(gateway.pid()).into_iter().filter(|p| p.comm == comm && p.state != 'Z').collect()
}

fn spare_pids(gateway: &Gateway) -> BTreeSet<u32> {
    with_comm(gateway, SPARE).iter().map(|p| p.pid).collect()
}

fn warm_workers(gateway: &Gateway) -> u64 {
    gateway.get_json("/healthz")["warm_workers"].as_u64().expect("/healthz counts warm workers")
}

/// Waits until the pool holds `spares` spares, by `/healthz` and by the process table.
fn wait_for_full_pool(gateway: &Gateway, spares: usize) -> BTreeSet<u32> {
    common::wait_for(|| {
        let pids = spare_pids(gateway);
        (pids.len() == spares && warm_workers(gateway) == spares as u64).then_some(pids)
    })
    .unwrap_or_else(|| {
        panic!(
            "the pool never held {spares} spares: /healthz {}, children {:?}",
            warm_workers(gateway),
            children_of(gateway.pid())
        )
    })
}

fn the_template(gateway: &Gateway) -> u32 {
    common::wait_for(|| with_comm(gateway, TEMPLATE).first().map(|p| p.pid))
        .unwrap_or_else(|| panic!("no template among {:?}", children_of(gateway.pid())))
}

#[tokio::test]
async fn spares_are_prepared_children_of_the_gateway_that_a_new_room_takes() {
    let gateway = Gateway::start(&["--warm-workers", "3"]);
    let spares = wait_for_full_pool(&gateway, 3);
    let template = the_template(&gateway);
    assert!(gateway.rooms().is_empty(), "spares are not rooms: {:?}", gateway.rooms());
    for pid in spares.iter().chain([&template]) {
        let info = process(*pid).expect("listed");
        assert_eq!(info.ppid, gateway.pid(), "{info:?} is not the gateway's child");
    }

    // The first room takes a spare: no process is started for it.
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join_ok("room:warm-a").await;
    let pid = gateway.wait_room_pid("warm-a");
    assert!(spares.contains(&pid), "room warm-a runs in {pid}, not one of the spares {spares:?}");
    let worker = process(pid).expect("the room's worker");
    assert_eq!(worker.comm, "room-worker", "a spare that took a room is named a room worker: {worker:?}");
    let reply = client.send_message(&join_ref, "room:warm-a", "ann", "hi").await;
    assert_eq!(reply["status"], "ok", "{reply}");

    // The pool refills with forks of the template, which are the gateway's children too.
    let refilled = wait_for_full_pool(&gateway, 3);
    let new: Vec<u32> = refilled.difference(&spares).copied().collect();
    assert_eq!(new.len(), 1, "one spare replaced the one taken: before {spares:?}, after {refilled:?}");
    assert_eq!(process(new[0]).expect("new spare").ppid, gateway.pid());
    assert_eq!(the_template(&gateway), template, "the template stays");
    assert!(zombies_of(gateway.pid()).is_empty(), "{:?}", zombies_of(gateway.pid()));
}

#[tokio::test]
async fn a_room_forked_from_the_template_is_killed_and_restarted_like_any_worker() {
    let gateway = Gateway::start(&["--warm-workers", "2"]);
    wait_for_full_pool(&gateway, 2);
    let mut client = gateway.connect().await;
    let (join_ref, _) = client.join_ok("room:forked").await;
    let first = gateway.wait_room_pid("forked");
    kill9(first);
    let reset = client.recv_until(|f| f[3] == "room_reset" && f[2] == "room:forked").await;
    assert_eq!(reset[4]["reason"], "room worker exited", "{reset}");
    let reply = client.send_message(&join_ref, "room:forked", "bo", "after").await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let second = gateway.wait_room_pid("forked");
    assert_ne!(second, first);
    assert_eq!(process(second).expect("restarted").ppid, gateway.pid());
    kill9(second);
    client.recv_until(|f| f[3] == "room_reset" && f[2] == "room:forked").await;
    assert!(common::wait_for(|| zombies_of(gateway.pid()).is_empty().then_some(())).is_some());
    assert!(!is_alive(first) && !is_alive(second));
}

#[tokio::test]
async fn a_killed_spare_is_replaced_and_a_killed_template_restarted() {
    let gateway = Gateway::start(&["--warm-workers", "2"]);
    let spares = wait_for_full_pool(&gateway, 2);
    let victim = *spares.iter().next().expect("a spare");
    kill9(victim);
    // Swept out (reaped, never handed to a room) and replaced.
    let after = common::wait_for(|| {
        let now = spare_pids(&gateway);
        (now.len() == 2 && !now.contains(&victim) && process(victim).is_none()).then_some(now)
    })
    .unwrap_or_else(|| panic!("spare {victim} not replaced: {:?}", children_of(gateway.pid())));
    assert!(zombies_of(gateway.pid()).is_empty(), "{:?}", zombies_of(gateway.pid()));

    let template = the_template(&gateway);
    kill9(template);
    // Rooms still start while the template is down: from the spares, then from exec.
    let mut client = gateway.connect().await;
    for room in 0..4 {
        let topic = format!("room:no-template-{room}");
        client.join_ok(&topic).await;
        gateway.wait_room_pid(&format!("no-template-{room}"));
    }
    let restarted = common::wait_for_within(Duration::from_secs(15), || {
        with_comm(&gateway, TEMPLATE).first().map(|p| p.pid).filter(|pid| *pid != template)
    })
    .unwrap_or_else(|| panic!("no new template: {:?}", children_of(gateway.pid())));
    assert_ne!(restarted, template);
    assert!(process(template).is_none(), "the killed template was reaped");
    wait_for_full_pool(&gateway, 2);
    assert!(zombies_of(gateway.pid()).is_empty(), "{:?}", zombies_of(gateway.pid()));
    drop(after);
}

#[tokio::test]
async fn a_burst_larger_than_the_pool_starts_every_room() {
    let gateway = Gateway::start(&["--warm-workers", "2", "--max-rooms-started-per-socket", "100"]);
    wait_for_full_pool(&gateway, 2);
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(gateway.connect().await);
    }
    // 24 first joins at once, six per socket, against two spares.
    let joins = clients.iter_mut().enumerate().map(|(c, client)| async move {
        for room in 0..6 {
            client.join_ok(&format!("room:burst-{c}-{room}")).await;
        }
    });
    futures_util::future::join_all(joins).await;
    let pids: BTreeSet<u32> =
        gateway.rooms().iter().filter_map(|r| r["pid"].as_u64()).map(|p| p as u32).collect();
    assert_eq!(pids.len(), 24, "{:?}", gateway.rooms());
    for pid in &pids {
        let info = process(*pid).expect("a room's worker");
        assert_eq!((info.ppid, info.comm.as_str()), (gateway.pid(), "room-worker"), "{info:?}");
    }
}

#[tokio::test]
async fn kill_9_of_the_gateway_takes_the_pool_and_its_forks_down() {
    let mut gateway = Gateway::start(&["--warm-workers", "3"]);
    wait_for_full_pool(&gateway, 3);
    let mut client = gateway.connect().await;
    client.join_ok("room:orphan-a").await;
    client.join_ok("room:orphan-b").await;
    gateway.wait_room_pid("orphan-b");
    // Rooms forked after the first fill, spares, the template: everything the gateway made.
    wait_for_full_pool(&gateway, 3);
    let everyone: Vec<u32> = children_of(gateway.pid()).iter().map(|p| p.pid).collect();
    assert_eq!(everyone.len(), 2 + 3 + 1, "{:?}", children_of(gateway.pid()));
    gateway.signal(nix::sys::signal::Signal::SIGKILL);
    let gone = common::wait_for_within(Duration::from_secs(2), || {
        everyone.iter().all(|pid| !is_alive(*pid)).then_some(())
    });
    let survivors: Vec<_> = everyone.iter().filter(|p| is_alive(**p)).filter_map(|p| process(*p)).collect();
    for survivor in &survivors {
        common::try_kill9(survivor.pid);
    }
    assert!(gone.is_some(), "outlived the gateway: {survivors:?}");
    gateway.wait_exit(Duration::from_secs(5));
}

#[tokio::test]
async fn zero_warm_workers_means_no_pool_and_rooms_still_start() {
    let gateway = Gateway::start(&["--warm-workers", "0"]);
    let mut client = gateway.connect().await;
    client.join_ok("room:cold").await;
    let pid = gateway.wait_room_pid("cold");
    let children = children_of(gateway.pid());
    assert_eq!(children.iter().map(|p| p.pid).collect::<Vec<_>>(), vec![pid], "{children:?}");
    assert_eq!(warm_workers(&gateway), 0);
}
