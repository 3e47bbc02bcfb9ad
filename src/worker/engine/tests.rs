//! The engine against a stand-in host: no process and no pipe, only what the engine asks of
//! its host, recorded.

use std::cell::RefCell;
use std::rc::Rc;

use super::{Engine, Host};
use crate::wire::{LogLevel, RuntimeLimits, ScriptError, ScriptErrorKind};

#[derive(Default)]
struct StandInHost {
    replies: RefCell<Vec<(u64, Result<String, ScriptError>)>>,
    host_calls: RefCell<Vec<(String, String)>>,
    posts: RefCell<Vec<(String, String)>>,
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

    fn subscribe(&self, _channel: &str) {}

    fn unsubscribe(&self, _channel: &str) {}

    fn log(&self, level: LogLevel, message: &str) {
        self.logs.borrow_mut().push((level, message.to_owned()));
    }

    fn reply(&self, call_id: u64, result: Result<String, ScriptError>) {
        self.replies.borrow_mut().push((call_id, result));
    }
}

fn start(script: &str, cpu_ms: u64) -> Result<(Engine, Rc<StandInHost>), ScriptError> {
    let host = Rc::new(StandInHost::default());
    let limits =
        RuntimeLimits { heap_bytes: 32 * 1024 * 1024, cpu_ms_per_call: cpu_ms, max_frame_bytes: 1 << 20 };
    let engine = Engine::start("test-room", "game", "room.js", script, &limits, host.clone())?;
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
