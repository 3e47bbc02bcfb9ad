//! What operators see: `GET /metrics`, scraped before and after real events (a join, a
//! message, a worker killed, a refused join), parsed with a Prometheus text parser and checked
//! to have moved by exactly what happened; and the logs as JSON, a room's lines carrying its
//! kind, id and pid; and the admin API acting on a room.

mod common;

use std::time::Duration;

use common::{kill9, script_file, Client, Gateway};
use prometheus_parse::{Scrape, Value};
use serde_json::json;

/// One scrape: the value of a sample by metric name and labels (a histogram's total count).
struct Metrics(Scrape);

impl Metrics {
    fn scrape(gateway: &Gateway) -> Metrics {
        let (status, body) = common::http_get(gateway.addr, "/metrics", &[]);
        assert_eq!(status, 200, "{body}");
        let lines = body.lines().map(|l| Ok(l.to_owned()));
        Metrics(Scrape::parse(lines).expect("the exposition parses"))
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let sample = self
            .0
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)));
        match sample.map(|s| &s.value) {
            Some(Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v)) => *v,
            Some(Value::Histogram(buckets)) => {
                buckets.iter().find(|b| b.less_than.is_infinite()).map_or(0.0, |b| b.count)
            }
            _ => 0.0,
        }
    }
}

/// Every frame the client reads until `quiet` passes without one; their total length in bytes.
async fn drain(client: &mut Client, quiet: Duration) -> (usize, usize) {
    let (mut frames, mut bytes) = (0, 0);
    while let Some(frame) = client.try_recv(quiet).await {
        frames += 1;
        bytes += frame.to_string().len();
    }
    (frames, bytes)
}

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn counters_move_by_exactly_what_happened() {
    let refusing = script_file("refusing.js", "function onJoin() { Room.refuse('no'); }");
    let gateway = Gateway::start(&["--room", &format!("closed={}", refusing.display())]);
    let before = Metrics::scrape(&gateway);
    let mut ann = gateway.connect().await;
    ann.presence = true;
    let (ann_ref, reply) = ann.join_with("room:m", json!({"name": "ann"})).await;
    let reply_bytes = json!([ann_ref, ann_ref, "room:m", "phx_reply", reply]).to_string().len();
    // After the join's reply: its presence_state, then the diff of its own arrival.
    let (frames, bytes) = drain(&mut ann, QUIET).await;
    let (frames, bytes) = (frames + 1, bytes + reply_bytes);
    let joined = Metrics::scrape(&gateway);
    let moved = |name: &str, labels: &[(&str, &str)], a: &Metrics, b: &Metrics| {
        b.get(name, labels) - a.get(name, labels)
    };
    assert_eq!(moved("roomvisor_joins_total", &[("result", "ok")], &before, &joined), 1.0);
    assert_eq!(moved("roomvisor_frames_in_total", &[], &before, &joined), 1.0);
    assert_eq!(moved("roomvisor_worker_starts_total", &[], &before, &joined), 1.0);
    assert_eq!(joined.get("roomvisor_sockets_open", &[]), 1.0);
    assert_eq!(joined.get("roomvisor_rooms_live", &[]), 1.0);
    assert!(moved("roomvisor_call_duration_seconds", &[("call", "join")], &before, &joined) >= 1.0);
    // Exactly what the client read, frames and bytes (re-serialized compactly, as sent).
    let out_frames = moved("roomvisor_frames_out_total", &[], &before, &joined);
    let out_bytes = moved("roomvisor_bytes_out_total", &[], &before, &joined);
    assert_eq!((out_frames, out_bytes), (frames as f64, bytes as f64));

    ann.send_message(&ann_ref, "room:m", "ann", "hi").await;
    // The reply was read by send_message; new_message follows (or came first, then kept).
    let (frames, _) = drain(&mut ann, QUIET).await;
    let frames = frames + 1;
    let sent = Metrics::scrape(&gateway);
    assert_eq!(moved("roomvisor_frames_in_total", &[], &joined, &sent), 1.0);
    assert_eq!(frames, 2, "the reply and new_message");
    assert_eq!(moved("roomvisor_frames_out_total", &[], &joined, &sent), 2.0);
    assert_eq!(moved("roomvisor_call_duration_seconds", &[("call", "event")], &joined, &sent), 1.0);

    kill9(gateway.wait_room_pid("m"));
    ann.next_event("room_reset").await;
    let killed = Metrics::scrape(&gateway);
    assert_eq!(moved("roomvisor_worker_exits_total", &[("reason", "killed")], &sent, &killed), 1.0);
    assert_eq!(moved("roomvisor_worker_starts_total", &[], &sent, &killed), 1.0, "restarted for its join");

    let (_, refused) = ann.join("closed:x").await;
    assert_eq!(refused["status"], "error");
    let after = Metrics::scrape(&gateway);
    assert_eq!(moved("roomvisor_joins_total", &[("result", "refused")], &killed, &after), 1.0);
    assert_eq!(moved("roomvisor_joins_total", &[("result", "ok")], &killed, &after), 0.0);
    drop(ann);
    let closed = common::wait_for(|| {
        let now = Metrics::scrape(&gateway);
        (now.get("roomvisor_sockets_open", &[]) == 0.0).then_some(())
    });
    assert!(closed.is_some(), "the closed socket is no longer counted");
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_and_a_rooms_lines_name_it() {
    let gateway = Gateway::start(&["--log-format", "json"]);
    let mut client = gateway.connect().await;
    client.join_ok("room:logged").await;
    let pid = gateway.wait_room_pid("logged");
    let started = common::wait_for(|| {
        gateway.log_lines_now().into_iter().find(|line| line.contains("room worker started"))
    })
    .expect("the start is logged");
    let line: serde_json::Value = serde_json::from_str(&started).expect("a JSON object per line");
    assert_eq!(line["fields"]["message"], "room worker started", "{line}");
    assert_eq!(line["span"], json!({"name": "room", "kind": "room", "id": "logged", "pid": pid}), "{line}");
    for line in gateway.log_lines_now() {
        assert!(serde_json::from_str::<serde_json::Value>(&line).is_ok(), "not JSON: {line}");
    }
}

#[tokio::test]
async fn the_admin_api_lists_kills_stops_reads_and_calls_a_room() {
    let script = script_file(
        "chatty.js",
        r#"const said = [];
           function onJoin(conn) { console.log("hello from the room"); return {}; }
           function onEvent() { return said; }
           function say(who, text) { said.push([who, text]); Room.broadcast("said", { who, text }); return said.length; }"#,
    );
    let gateway = Gateway::start(&["--room", &format!("talk={}", script.display())]);
    let mut ann = gateway.connect().await;
    let (_, reply) = ann.join("talk:a").await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let pid = gateway.wait_room_pid("a");

    let rooms: serde_json::Value =
        serde_json::from_str(&common::http_get(gateway.addr, "/api/admin/rooms", &[]).1).expect("JSON");
    let room = rooms.as_array().and_then(|r| r.iter().find(|r| r["id"] == "a")).cloned().expect("listed");
    assert_eq!((room["kind"].as_str(), room["pid"].as_u64()), (Some("talk"), Some(u64::from(pid))));
    assert!(room["rss_bytes"].as_u64().is_some_and(|b| b > 1024 * 1024), "a worker's RSS: {room}");
    assert!(room["cpu_ms"].is_u64() && room["uptime_ms"].is_u64(), "{room}");
    assert!(room["heap_used_bytes"].as_u64().is_some_and(|b| b > 10_000), "the engine's heap: {room}");

    let logs = common::wait_for(|| {
        let (_, body) = common::http_get(gateway.addr, "/api/admin/rooms/talk/a/logs", &[]);
        body.contains("hello from the room").then_some(body)
    });
    let logs: serde_json::Value =
        serde_json::from_str(&logs.expect("the console line is kept")).expect("JSON");
    assert_eq!(logs["lines"][0]["level"], "info");
    assert_eq!(logs["lines"][0]["pid"], pid);

    let (status, body) = common::http_post_json(
        gateway.addr,
        "/api/admin/rooms/talk/a/call",
        r#"{"function":"say","args":["ops","hi all"]}"#,
    );
    assert_eq!((status, body.as_str()), (200, r#"{"result":1}"#));
    assert_eq!(ann.next_event("said").await[4], json!({"who": "ops", "text": "hi all"}));
    let (status, body) =
        common::http_post_json(gateway.addr, "/api/admin/rooms/talk/a/call", r#"{"function":"nope"}"#);
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("no function named"), "the operator sees the script's message: {body}");

    let (status, _) = common::http_post(gateway.addr, "/api/admin/rooms/talk/a/kill", &[]);
    assert_eq!(status, 200);
    ann.next_event("room_reset").await;
    let restarted = common::wait_for(|| gateway.room_pid("a").filter(|p| *p != pid));
    assert!(restarted.is_some(), "a killed room with a join restarts with a new worker");

    let (status, _) = common::http_post(gateway.addr, "/api/admin/rooms/talk/a/stop", &[]);
    assert_eq!(status, 200);
    let stopped = common::wait_for(|| gateway.room_pid("a").is_none().then_some(()));
    assert!(stopped.is_some(), "a stopped room is gone until its next use");
    for path in
        ["/api/admin/rooms/talk/a/kill", "/api/admin/rooms/nokind/a/kill", "/api/admin/rooms/talk/a%20b/kill"]
    {
        let (status, _) = common::http_post(gateway.addr, path, &[]);
        assert!(status == 404 || status == 400, "{path}: {status}");
    }
}

#[test]
fn the_admin_api_the_dashboard_and_metrics_answer_this_machine_and_token_holders_only() {
    let Some(ip) = common::non_loopback_address() else {
        eprintln!("SKIPPED: the_admin_api_the_dashboard_and_metrics_answer_this_machine_and_token_holders_only: no non-loopback address");
        return;
    };
    let open = Gateway::start(&["--bind", "0.0.0.0"]);
    let remote = std::net::SocketAddr::new(ip, open.addr.port());
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], open.addr.port()));
    for path in ["/api/admin/rooms", "/admin", "/metrics"] {
        assert_eq!(common::http_get(local, path, &[]).0, 200, "{path} from this machine");
        assert_eq!(common::http_get(remote, path, &[]).0, 403, "{path} from another address");
    }
    assert_eq!(common::http_post(remote, "/api/admin/rooms/room/x/kill", &[]).0, 403);

    let guarded = Gateway::start(&["--bind", "0.0.0.0", "--admin-token", "adm1n", "--api-token", "ap1"]);
    let remote = std::net::SocketAddr::new(ip, guarded.addr.port());
    let bearer = |token: &'static str| [("Authorization", token)];
    assert_eq!(common::http_get(remote, "/api/admin/rooms", &bearer("Bearer wrong")).0, 403);
    assert_eq!(common::http_get(remote, "/api/admin/rooms", &bearer("Bearer adm1n")).0, 200);
    assert_eq!(common::http_get(remote, "/admin", &[]).0, 200, "the page, whose data needs the token");
    assert_eq!(
        common::http_get(remote, "/metrics", &bearer("Bearer adm1n")).0,
        403,
        "metrics take the API token"
    );
    assert_eq!(common::http_get(remote, "/metrics", &bearer("Bearer ap1")).0, 200);
}
