// The script suite: the engine against a stand-in host, no process and no pipe, only what the
// engine asks of its host, recorded. Included once per engine by tests/mod.rs, with `ENGINE`
// naming it, so that every engine is held to the same tests.

use std::cell::RefCell;
use std::rc::Rc;

use crate::worker::engine::{Durable, Engine, Host, RoomInit};
use crate::wire::{LogLevel, RuntimeLimits, ScriptError, ScriptErrorKind};

#[derive(Default)]
struct StandInHost {
    replies: RefCell<Vec<(u64, Result<String, ScriptError>)>>,
    host_calls: RefCell<Vec<(String, String)>>,
    posts: RefCell<Vec<(String, String)>>,
    /// `Room.push` (conn, event, payload) and `Room.broadcast` (event, payload, except).
    pushes: RefCell<Vec<(String, String, String)>>,
    broadcasts: RefCell<Vec<(String, String, Vec<String>)>>,
    logs: RefCell<Vec<(LogLevel, String)>>,
}

impl Host for StandInHost {
    fn host_call_sync(&self, name: &str, args_json: &str) -> Result<String, String> {
        self.host_calls.borrow_mut().push((name.to_owned(), args_json.to_owned()));
        Ok(r#"{"answered":true}"#.to_owned())
    }

    fn host_call_async(&self, name: &str, args_json: &str) -> u64 {
        let mut calls = self.host_calls.borrow_mut();
        calls.push((name.to_owned(), args_json.to_owned()));
        calls.len() as u64
    }

    fn post(&self, channel: &str, data_json: &str) {
        self.posts.borrow_mut().push((channel.to_owned(), data_json.to_owned()));
    }

    fn push(&self, conn: &str, event: &str, payload_json: &str) {
        self.pushes.borrow_mut().push((conn.to_owned(), event.to_owned(), payload_json.to_owned()));
    }

    fn broadcast(&self, event: &str, payload_json: &str, except: Vec<String>) {
        self.broadcasts.borrow_mut().push((event.to_owned(), payload_json.to_owned(), except));
    }

    fn track(&self, conn: &str, key: &str, meta_json: &str) {
        self.host_calls.borrow_mut().push(("track".to_owned(), format!("{conn} {key} {meta_json}")));
    }

    fn untrack(&self, conn: &str) {
        self.host_calls.borrow_mut().push(("untrack".to_owned(), conn.to_owned()));
    }

    fn subscribe(&self, _channel: &str) {}

    fn unsubscribe(&self, _channel: &str) {}

    fn log(&self, level: LogLevel, message: &str) {
        self.logs.borrow_mut().push((level, message.to_owned()));
    }

    fn reply(&self, call_id: u64, result: Result<String, ScriptError>) {
        self.replies.borrow_mut().push((call_id, result));
    }

    fn storage_put(&self, key: &str, value_json: &str, _stored_bytes: u64) -> Result<(), String> {
        self.host_calls.borrow_mut().push(("put".to_owned(), format!("{key} {value_json}")));
        Ok(())
    }

    fn storage_delete(&self, key: &str, _stored_bytes: u64) {
        self.host_calls.borrow_mut().push(("delete".to_owned(), key.to_owned()));
    }

    fn set_alarm(&self, at: Option<u64>) {
        self.host_calls.borrow_mut().push(("alarm".to_owned(), format!("{at:?}")));
    }
}

const SETTINGS: &str = r#"{"historyOnJoin":2,"maxSenderChars":5,"maxTextChars":10}"#;

fn start(script: &str, cpu_ms: u64) -> Result<(Engine, Rc<StandInHost>), ScriptError> {
    let host = Rc::new(StandInHost::default());
    let limits =
        RuntimeLimits { engine: ENGINE, heap_bytes: 32 * 1024 * 1024, cpu_ms_per_call: cpu_ms, max_frame_bytes: 1 << 20 };
    let room = RoomInit {
        room_id: "test-room",
        kind: "game",
        script_name: "room.js",
        script,
        settings_json: SETTINGS,
        epoch: 7,
        storage: None,
    };
    let engine = Engine::start(&room, &limits, host.clone())?;
    Ok((engine, host))
}

fn last_reply(host: &StandInHost) -> (u64, Result<String, ScriptError>) {
    host.replies.borrow().last().cloned().expect("the engine replied")
}

#[test]
fn a_call_replies_with_the_functions_result_as_json() {
    let (engine, host) = start("function add(a, b) { return { sum: a + b }; }", 1_000).unwrap();
    engine.call(7, "add", "[2, 3]");
    assert_eq!(last_reply(&host), (7, Ok(r#"{"sum":5}"#.to_owned())));
}

#[test]
fn an_async_function_replies_once_its_promise_settles() {
    let script = "async function later(x) { const got = await Beam.call('echo', x); return [x, got]; }";
    let (engine, host) = start(script, 1_000).unwrap();
    engine.call(1, "later", "[4]");
    assert!(host.replies.borrow().is_empty(), "no reply before the host answers");
    assert_eq!(host.host_calls.borrow().as_slice(), [("echo".to_owned(), "[4]".to_owned())]);
    engine.settle_host_call(1, Ok("\"pong\"".to_owned()));
    assert_eq!(last_reply(&host), (1, Ok(r#"[4,"pong"]"#.to_owned())));
}

#[test]
fn a_throw_becomes_an_exception_with_its_name() {
    let (engine, host) = start("function boom() { throw new TypeError('bad input'); }", 1_000).unwrap();
    engine.call(1, "boom", "[]");
    let error = last_reply(&host).1.unwrap_err();
    assert_eq!(error.kind, ScriptErrorKind::Exception);
    assert_eq!(error.message, "bad input", "a call's error is the script's message, as clients see it");
    engine.call(2, "missing", "[]");
    assert!(last_reply(&host).1.unwrap_err().message.contains("no function named \"missing\""));
}

#[test]
fn a_busy_loop_is_cut_off_and_the_runtime_still_answers() {
    let script = "function spin() { for (;;) {} } function ping() { return 'pong'; }";
    let (engine, host) = start(script, 50).unwrap();
    engine.call(1, "spin", "[]");
    assert_eq!(last_reply(&host).1.unwrap_err().kind, ScriptErrorKind::Timeout);
    engine.call(2, "ping", "[]");
    assert_eq!(last_reply(&host), (2, Ok("\"pong\"".to_owned())));
}

#[test]
fn a_heap_hog_fails_its_call_and_the_runtime_still_answers() {
    let script = "function hog() { const held = []; for (;;) held.push(new Array(1 << 16).fill(held.length)); }
                  function ping() { return 'pong'; }";
    // A generous CPU budget, so that only the heap limit stops it.
    let (engine, host) = start(script, 20_000).unwrap();
    engine.call(1, "hog", "[]");
    assert_eq!(last_reply(&host).1.unwrap_err().kind, ScriptErrorKind::OutOfMemory);
    engine.call(2, "ping", "[]");
    assert_eq!(last_reply(&host), (2, Ok("\"pong\"".to_owned())));
    engine.call(3, "hog", "[]");
    assert_eq!(last_reply(&host).1.unwrap_err().kind, ScriptErrorKind::OutOfMemory, "the limit is back");
}

#[test]
fn a_heap_hog_is_stopped_near_its_limit() {
    // Megabyte strings, each kept: how many were held says how far past its 32 MiB the heap
    // grew. The budget only bounds the test: the hog should stop in a few dozen milliseconds.
    let script = "let most = 0;
                  function hog() {
                    const held = [];
                    for (;;) { held.push('x'.repeat(1 << 10).repeat(1 << 10) + held.length); most = held.length; }
                  }
                  function held() { return most; }";
    let (engine, host) = start(script, 2_000).unwrap();
    engine.call(1, "hog", "[]");
    assert_eq!(last_reply(&host).1.unwrap_err().kind, ScriptErrorKind::OutOfMemory);
    engine.call(2, "held", "[]");
    let held: u64 = last_reply(&host).1.unwrap().parse().unwrap();
    assert!((24..=40).contains(&held), "{held} MiB held at a 32 MiB limit");
}

#[test]
fn a_promise_job_past_the_budget_answers_its_call_with_timeout() {
    let script = "async function spinAfterAwait() { await null; for (;;) {} } function ping() { return 'pong'; }";
    let (engine, host) = start(script, 50).unwrap();
    engine.call(1, "spinAfterAwait", "[]");
    assert_eq!(reply_to(&host, 1).unwrap_err().kind, ScriptErrorKind::Timeout);
    engine.call(2, "ping", "[]");
    assert_eq!(reply_to(&host, 2), Ok("\"pong\"".to_owned()));
}

#[test]
fn an_unhandled_rejection_is_logged() {
    let (engine, host) = start("function reject() { Promise.reject(new Error('nobody listens')); }", 1_000).unwrap();
    engine.call(1, "reject", "[]");
    let logs = host.logs.borrow();
    assert!(
        logs.iter().any(|(level, text)| *level == LogLevel::Error
            && text.contains("unhandled promise rejection: nobody listens")),
        "{logs:?}"
    );
}

#[test]
fn a_syntax_error_fails_the_start_and_names_where() {
    let error = start("function broken( {", 1_000).err().expect("the start fails");
    assert!(error.message.starts_with("SyntaxError"), "{}", error.message);
    assert!(error.message.contains("room.js:1"), "{}", error.message);
}

#[test]
fn the_script_knows_its_room() {
    let (engine, host) =
        start("function whoami() { return [Room.id, Room.kind, Room.topic]; }", 1_000).unwrap();
    engine.call(1, "whoami", "[]");
    assert_eq!(last_reply(&host), (1, Ok(r#"["test-room","game","game:test-room"]"#.to_owned())));
}

#[test]
fn posts_and_console_go_through_the_host() {
    let script = "const ch = new BroadcastChannel('news'); \
                  function tell(x) { ch.postMessage({ x }); console.warn('told', x); }";
    let (engine, host) = start(script, 1_000).unwrap();
    engine.call(1, "tell", "[1]");
    assert_eq!(host.posts.borrow().as_slice(), [("news".to_owned(), r#"{"x":1}"#.to_owned())]);
    assert!(host.logs.borrow().iter().any(|(level, text)| *level == LogLevel::Warn && text == "told 1"));
}

#[test]
fn a_timer_runs_once_it_is_due() {
    let script = "let fired = 0; setTimeout(() => { fired += 1; }, 0); function count() { return fired; }";
    let (engine, host) = start(script, 1_000).unwrap();
    let due = engine.next_timer_at().expect("a timer is armed");
    std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
    engine.run_due_timers();
    assert_eq!(engine.next_timer_at(), None, "the timer is spent");
    engine.call(1, "count", "[]");
    assert_eq!(last_reply(&host), (1, Ok("1".to_owned())));
}

fn reply_to(host: &StandInHost, id: u64) -> Result<String, ScriptError> {
    let replies = host.replies.borrow();
    replies.iter().find(|(call, _)| *call == id).map(|(_, r)| r.clone()).expect("the call was answered")
}

#[test]
fn hooks_see_joins_events_and_leaves_with_their_conn() {
    let script = r#"
        const seen = [];
        function onJoin(conn, params) {
            if (params.name === "mallory") Room.refuse("not on the list");
            conn.assigns.name = params.name;
            return { you: conn.id, here: Room.connections().map((c) => c.id) };
        }
        function onEvent(conn, event, payload) {
            if (event === "boom") null.x;
            if (event === "whisper") { Room.push(payload.to, "psst", { from: conn.assigns.name }); return; }
            Room.broadcast("said", { by: conn.assigns.name }, { except: conn.id });
            return { ok: event };
        }
        async function onLeave(conn, why) { seen.push([conn.id, why, Room.connections().length]); }
        function left() { return seen; }
    "#;
    let (engine, host) = start(script, 1_000).unwrap();
    engine.call(1, "@join", r#"["a",null,{"name":"ann"}]"#);
    assert_eq!(reply_to(&host, 1), Ok(r#"{"you":"a","here":["a"]}"#.to_owned()));
    engine.call(2, "@join", r#"["m",null,{"name":"mallory"}]"#);
    let refused = reply_to(&host, 2).unwrap_err();
    assert_eq!((refused.kind, refused.message.as_str()), (ScriptErrorKind::Refused, "not on the list"));
    engine.call(3, "@join", r#"["b",null,{"name":"bob"}]"#);
    assert_eq!(
        reply_to(&host, 3),
        Ok(r#"{"you":"b","here":["a","b"]}"#.to_owned()),
        "a refused join is gone"
    );

    engine.call(4, "@event", r#"["a","hello",{}]"#);
    assert_eq!(reply_to(&host, 4), Ok(r#"{"ok":"hello"}"#.to_owned()));
    let broadcasts = host.broadcasts.borrow().clone();
    assert_eq!(broadcasts, [("said".to_owned(), r#"{"by":"ann"}"#.to_owned(), vec!["a".to_owned()])]);
    engine.call(5, "@event", r#"["b","whisper",{"to":"a"}]"#);
    assert_eq!(reply_to(&host, 5), Ok("{}".to_owned()), "undefined answers {{}}");
    let pushes = host.pushes.borrow().clone();
    assert_eq!(pushes, [("a".to_owned(), "psst".to_owned(), r#"{"from":"bob"}"#.to_owned())]);

    engine.call(6, "@event", r#"["b","boom",{}]"#);
    let failed = reply_to(&host, 6).unwrap_err();
    assert_eq!(failed.kind, ScriptErrorKind::Exception);
    assert!(failed.message.contains("of null"), "{}", failed.message);
    assert!(failed.stack.as_deref().unwrap_or_default().contains("room.js:"), "{failed:?}");

    engine.call(7, "@event", r#"["zed","hello",{}]"#);
    assert_eq!(reply_to(&host, 7).unwrap_err().kind, ScriptErrorKind::UnknownConnection);

    engine.call(8, "@leave", r#"["a","leave"]"#);
    engine.call(9, "left", "[]");
    assert_eq!(reply_to(&host, 9), Ok(r#"[["a","leave",1]]"#.to_owned()), "onLeave runs once a's gone");
}

#[test]
fn an_async_hook_that_rejects_fails_its_call() {
    let script = r#"
        async function onJoin(conn) { await null; throw new RangeError("no seats"); }
        function count() { return Room.connections().length; }
    "#;
    let (engine, host) = start(script, 1_000).unwrap();
    engine.call(1, "@join", r#"["a",null,{}]"#);
    let error = reply_to(&host, 1).unwrap_err();
    assert_eq!(error.kind, ScriptErrorKind::Exception);
    assert!(error.message.contains("no seats"), "{}", error.message);
    engine.call(2, "count", "[]");
    assert_eq!(reply_to(&host, 2), Ok("0".to_owned()), "a failed join is not a connection");
}

#[test]
fn a_script_without_hooks_keeps_the_original_mapping_and_its_checks() {
    let script = r#"
        const messages = [];
        function sendMessage(sender, text) { const m = { sender, text }; messages.push(m); return m; }
        function getHistory(n) { return messages.slice(-n); }
    "#;
    let (engine, host) = start(script, 1_000).unwrap();
    engine.call(1, "@join", r#"["a",null,{}]"#);
    assert_eq!(reply_to(&host, 1), Ok(r#"{"messages":[]}"#.to_owned()));
    for (id, text) in [(2, "one"), (3, "two"), (4, "three")] {
        engine.call(id, "@event", &format!(r#"["a","send_message",{{"sender":"ann","text":"{text}"}}]"#));
    }
    assert_eq!(reply_to(&host, 4), Ok(r#"{"sender":"ann","text":"three"}"#.to_owned()));
    engine.call(5, "@event", r#"["a","send_message",{"sender":"annabel","text":"x"}]"#);
    assert_eq!(reply_to(&host, 5).unwrap_err().message, "sender is longer than 5 characters");
    engine.call(6, "@event", r#"["a","shout",{}]"#);
    assert_eq!(reply_to(&host, 6).unwrap_err().message, "unknown event");
    engine.call(7, "@join", r#"["b",null,{}]"#);
    assert_eq!(
        reply_to(&host, 7),
        Ok(r#"{"messages":[{"sender":"ann","text":"two"},{"sender":"ann","text":"three"}]}"#.to_owned()),
        "a join gets the last historyOnJoin messages"
    );
}

#[test]
fn rooms_may_not_send_phoenix_events() {
    let script = r#"function onEvent(conn, event) { Room.broadcast("phx_close", {}); }
                    function onJoin() {}"#;
    let (engine, host) = start(script, 1_000).unwrap();
    engine.call(1, "@join", r#"["a",null,{}]"#);
    engine.call(2, "@event", r#"["a","x",{}]"#);
    let error = reply_to(&host, 2).unwrap_err();
    assert!(error.message.contains("not an event a room may send"), "{}", error.message);
    assert!(host.broadcasts.borrow().is_empty());
}

#[test]
fn an_async_get_history_answers_the_join_once_it_settles() {
    let script = "async function getHistory(n) { await null; return ['m', n]; }";
    let (engine, host) = start(script, 1_000).unwrap();
    engine.call(1, "@join", r#"["a",null,{}]"#);
    assert_eq!(reply_to(&host, 1), Ok(r#"{"messages":["m",2]}"#.to_owned()));
}

fn start_durable(script: &str, entries: &[(&str, &str)], max_bytes: u64) -> (Engine, Rc<StandInHost>) {
    let host = Rc::new(StandInHost::default());
    let limits =
        RuntimeLimits { engine: ENGINE, heap_bytes: 32 * 1024 * 1024, cpu_ms_per_call: 1_000, max_frame_bytes: 1 << 20 };
    let storage = Durable {
        alarm_at: None,
        max_bytes,
        entries: entries.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    let room = RoomInit {
        room_id: "test-room",
        kind: "room",
        script_name: "room.js",
        script,
        settings_json: SETTINGS,
        epoch: 7,
        storage: Some(storage),
    };
    let engine = Engine::start(&room, &limits, host.clone()).expect("the script starts");
    (engine, host)
}

fn call_ok(engine: &Engine, host: &StandInHost, function: &str, args: &str) -> serde_json::Value {
    engine.call(99, function, args);
    let (id, result) = last_reply(host);
    assert_eq!(id, 99);
    serde_json::from_str(&result.unwrap_or_else(|e| panic!("{function} failed: {e:?}"))).unwrap()
}

#[test]
fn a_transient_room_has_an_epoch_and_no_storage() {
    let script = "function probe() { return [Room.epoch, typeof Room.storage]; }
                  function alarm() { Room.setAlarm(Date.now()); }";
    let (engine, host) = start(script, 1_000).unwrap();
    engine.call(1, "probe", "[]");
    assert_eq!(last_reply(&host), (1, Ok(r#"[7,"undefined"]"#.to_owned())));
    engine.call(2, "alarm", "[]");
    let error = last_reply(&host).1.unwrap_err();
    assert!(error.message.contains("needs a durable room"), "{error:?}");
}

#[test]
fn storage_reads_what_it_was_started_with_and_lists_in_key_order() {
    let script = r#"
        function list(options) { return [...Room.storage.list(options)]; }
        function get(key) { return Room.storage.get(key); }
    "#;
    let entries = [("b", "2"), ("a:1", r#"{"n":1}"#), ("a:2", r#"{"n":2}"#), ("a:3", r#"{"n":3}"#)];
    let (engine, host) = start_durable(script, &entries, 1 << 20);
    assert_eq!(call_ok(&engine, &host, "get", r#"["a:2"]"#), serde_json::json!({"n": 2}));
    assert_eq!(call_ok(&engine, &host, "get", r#"["nope"]"#), serde_json::Value::Null);
    let listed = call_ok(&engine, &host, "list", r#"[{"prefix": "a:"}]"#);
    assert_eq!(listed, serde_json::json!([["a:1", {"n": 1}], ["a:2", {"n": 2}], ["a:3", {"n": 3}]]));
    let page = call_ok(&engine, &host, "list", r#"[{"start": "a:2", "limit": 2}]"#);
    assert_eq!(page, serde_json::json!([["a:2", {"n": 2}], ["a:3", {"n": 3}]]));
    let backwards = call_ok(&engine, &host, "list", r#"[{"reverse": true, "limit": 1}]"#);
    assert_eq!(backwards, serde_json::json!([["b", 2]]));
}

#[test]
fn writes_reach_the_host_in_order_and_reads_are_copies() {
    let script = r#"
        function write() {
          const value = { list: [1] };
          Room.storage.put("k", value);
          value.list.push(2);
          const read = Room.storage.get("k");
          read.list.push(3);
          Room.storage.put({ x: 1, y: "two" });
          return [Room.storage.get("k"), Room.storage.delete("x"), Room.storage.delete("missing"), Room.storage.bytes];
        }
    "#;
    let (engine, host) = start_durable(script, &[], 1 << 20);
    let result = call_ok(&engine, &host, "write", "[]");
    assert_eq!(result[0], serde_json::json!({"list": [1]}), "what was put, not what was changed since");
    assert_eq!(result[1], true);
    assert_eq!(result[2], false);
    assert_eq!(result[3], ("k".len() + r#"{"list":[1]}"#.len() + "y".len() + r#""two""#.len()) as u64);
    let writes: Vec<(String, String)> =
        host.host_calls.borrow().iter().filter(|(n, _)| n == "put" || n == "delete").cloned().collect();
    let expected = [("put", r#"k {"list":[1]}"#), ("put", "x 1"), ("put", r#"y "two""#), ("delete", "x")];
    assert_eq!(writes, expected.map(|(n, a)| (n.to_owned(), a.to_owned())));
}

#[test]
fn bad_writes_throw_and_change_nothing() {
    let script = r#"
        function attempt(what) {
          try {
            if (what === "undefined") Room.storage.put("k", undefined);
            if (what === "function") Room.storage.put("k", () => 1);
            if (what === "key") Room.storage.put(42, 1);
            if (what === "big") Room.storage.put("k", "x".repeat(200 * 1024));
            if (what === "full") Room.storage.put("k", "x".repeat(900));
            if (what === "second") Room.storage.put("k2", "x".repeat(900));
          } catch (err) {
            return [err.name, Room.storage.get("k") ?? null];
          }
          return "no error";
        }
    "#;
    let (engine, host) = start_durable(script, &[], 1024);
    for (what, name) in
        [("undefined", "TypeError"), ("function", "TypeError"), ("key", "TypeError"), ("big", "RangeError")]
    {
        let result = call_ok(&engine, &host, "attempt", &format!("[\"{what}\"]"));
        assert_eq!(result, serde_json::json!([name, null]), "{what}");
    }
    assert_eq!(call_ok(&engine, &host, "attempt", r#"["full"]"#), "no error");
    let again = call_ok(&engine, &host, "attempt", r#"["full"]"#);
    assert_eq!(again, "no error", "overwriting a key counts its new size, not both");
    // A second 900-byte value does not fit in the room's 1,024 bytes beside the first.
    assert_eq!(call_ok(&engine, &host, "attempt", r#"["second"]"#)[0], "RangeError");
    assert_eq!(host.host_calls.borrow().iter().filter(|(n, _)| n == "put").count(), 2);
}

#[test]
fn an_alarm_runs_on_alarm_once_and_is_deleted_unless_it_set_another() {
    let script = r#"
        let runs = 0;
        function arm(at) { Room.setAlarm(at); return Room.getAlarm(); }
        function onAlarm() { runs++; if (runs === 2) Room.setAlarm(5000); }
        function state() { return [runs, Room.getAlarm()]; }
    "#;
    let (engine, host) = start_durable(script, &[], 1 << 20);
    assert_eq!(call_ok(&engine, &host, "arm", "[1000]"), 1000);
    // Fired for a time the room no longer has: not run.
    assert_eq!(call_ok(&engine, &host, "@alarm", "[999]"), serde_json::json!({"ran": false}));
    assert_eq!(call_ok(&engine, &host, "@alarm", "[1000]"), serde_json::json!({"ran": true}));
    assert_eq!(call_ok(&engine, &host, "state", "[]"), serde_json::json!([1, null]));
    // Fired twice (two nodes, say): the second finds it gone.
    assert_eq!(call_ok(&engine, &host, "@alarm", "[1000]"), serde_json::json!({"ran": false}));
    call_ok(&engine, &host, "arm", "[2000]");
    call_ok(&engine, &host, "@alarm", "[2000]");
    assert_eq!(call_ok(&engine, &host, "state", "[]"), serde_json::json!([2, 5000]), "the one it set stays");
    let alarms: Vec<String> =
        host.host_calls.borrow().iter().filter(|(n, _)| n == "alarm").map(|(_, a)| a.clone()).collect();
    assert_eq!(alarms, ["Some(1000)", "None", "Some(2000)", "Some(5000)"]);
}
