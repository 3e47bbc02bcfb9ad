//! The deno_core backend (`--engine deno`): the same prelude and the same natives as the
//! QuickJS backend, here as deno_core ops, on whichever backend deno_core was built with (its
//! QuickJS-based v8x with the cargo feature `deno`, real V8 with `v8`). Only V8's own API is
//! used for limits, so the code is the same on both (but for what the heap-limit callback
//! lends):
//!
//! - heap: the isolate's heap limit, and a near-heap-limit callback that terminates the
//!   running script (and, on V8, lends it room to unwind: `unwind_allowance`), so a hog fails
//!   its call and the room lives;
//! - CPU: a watchdog thread reads this thread's CPU clock and calls `terminate_execution`
//!   when one macrotask has used its budget (V8 has no interrupt hook that polls, as QuickJS
//!   does; `terminate_execution` is the thread-safe way in).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use deno_core::{op2, serde_v8, v8, JsRuntime, OpState, RuntimeOptions};
use deno_error::JsErrorBox;

use super::{
    classify_message, epoch_ms_f64, log_failure, timeout_error, timer_deadline, Durable, Host, RoomInit,
    PRELUDE,
};
use crate::wire::{LogLevel, RuntimeLimits, ScriptError, ScriptErrorKind, WorkerStats};

/// Builds the natives object the prelude expects out of this module's ops, then takes
/// deno_core's own globals away from the room script: `Deno.core` reaches every op
/// deno_core has, which no room script should.
const NATIVES: &str = r#"(() => {
  const ops = Deno.core.ops;
  const native = {
    hostCallSync: ops.op_room_host_call_sync,
    hostCallAsync: ops.op_room_host_call_async,
    post: ops.op_room_post,
    push: ops.op_room_push,
    broadcast: ops.op_room_broadcast,
    track: ops.op_room_track,
    untrack: ops.op_room_untrack,
    subscribe: ops.op_room_subscribe,
    unsubscribe: ops.op_room_unsubscribe,
    log: ops.op_room_log,
    storagePut: ops.op_room_storage_put,
    storageDelete: ops.op_room_storage_delete,
    setAlarm: ops.op_room_set_alarm,
    replyOk: ops.op_room_reply_ok,
    replyError: ops.op_room_reply_error,
  };
  delete globalThis.Deno;
  delete globalThis.__bootstrap;
  return native;
})()"#;

/// Kept in the runtime's OpState, where the ops find it.
struct HostHandle(Rc<dyn Host>);

fn host(state: &OpState) -> Rc<dyn Host> {
    state.borrow::<HostHandle>().0.clone()
}

#[op2]
#[string]
fn op_room_host_call_sync(
    state: &mut OpState,
    #[string] name: String,
    #[string] args: String,
) -> Result<String, JsErrorBox> {
    host(state).host_call_sync(&name, &args).map_err(JsErrorBox::generic)
}

#[op2(fast)]
fn op_room_host_call_async(state: &mut OpState, #[string] name: String, #[string] args: String) -> f64 {
    host(state).host_call_async(&name, &args) as f64
}

#[op2(fast)]
fn op_room_post(state: &mut OpState, #[string] channel: String, #[string] data: String) {
    host(state).post(&channel, &data)
}

#[op2(fast)]
fn op_room_push(
    state: &mut OpState,
    #[string] conn: String,
    #[string] event: String,
    #[string] payload: String,
) {
    host(state).push(&conn, &event, &payload)
}

#[op2]
fn op_room_broadcast(
    state: &mut OpState,
    #[string] event: String,
    #[string] payload: String,
    #[serde] except: Vec<String>,
) {
    host(state).broadcast(&event, &payload, except)
}

#[op2(fast)]
fn op_room_track(state: &mut OpState, #[string] conn: String, #[string] key: String, #[string] meta: String) {
    host(state).track(&conn, &key, &meta)
}

#[op2(fast)]
fn op_room_untrack(state: &mut OpState, #[string] conn: String) {
    host(state).untrack(&conn)
}

#[op2(fast)]
fn op_room_subscribe(state: &mut OpState, #[string] channel: String) {
    host(state).subscribe(&channel)
}

#[op2(fast)]
fn op_room_unsubscribe(state: &mut OpState, #[string] channel: String) {
    host(state).unsubscribe(&channel)
}

#[op2(fast)]
fn op_room_log(state: &mut OpState, #[string] level: String, #[string] message: String) {
    let level = match level.as_str() {
        "debug" => LogLevel::Debug,
        "warn" => LogLevel::Warn,
        "error" => LogLevel::Error,
        _ => LogLevel::Info,
    };
    host(state).log(level, &message)
}

#[op2(fast)]
fn op_room_storage_put(
    state: &mut OpState,
    #[string] key: String,
    #[string] json: String,
    stored: f64,
) -> Result<(), JsErrorBox> {
    host(state).storage_put(&key, &json, stored as u64).map_err(JsErrorBox::range_error)
}

#[op2(fast)]
fn op_room_storage_delete(state: &mut OpState, #[string] key: String, stored: f64) {
    host(state).storage_delete(&key, stored as u64)
}

#[op2(fast)]
fn op_room_set_alarm(state: &mut OpState, at: f64) {
    host(state).set_alarm((at >= 0.0).then_some(at as u64))
}

#[op2(fast)]
fn op_room_reply_ok(state: &mut OpState, id: f64, #[string] json: String) {
    host(state).reply(id as u64, Ok(json))
}

#[op2(fast)]
fn op_room_reply_error(
    state: &mut OpState,
    id: f64,
    #[string] message: String,
    #[string] stack: String,
    #[string] kind: String,
) {
    let kind = match kind.as_str() {
        "refused" => ScriptErrorKind::Refused,
        "unknown_connection" => ScriptErrorKind::UnknownConnection,
        _ => classify_message(&message),
    };
    let stack = (!stack.is_empty()).then_some(stack);
    host(state).reply(id as u64, Err(ScriptError { kind, message, stack }))
}

deno_core::extension!(
    roomvisor_natives,
    ops = [
        op_room_host_call_sync,
        op_room_host_call_async,
        op_room_post,
        op_room_push,
        op_room_broadcast,
        op_room_track,
        op_room_untrack,
        op_room_subscribe,
        op_room_unsubscribe,
        op_room_log,
        op_room_storage_put,
        op_room_storage_delete,
        op_room_set_alarm,
        op_room_reply_ok,
        op_room_reply_error,
    ],
);

/// Terminates the isolate once the thread that runs it has used a macrotask's CPU budget.
///
/// CPU time never runs ahead of wall time, so the watchdog sleeps (wall time) for whatever is
/// left of the budget and reads the clock again: it costs a few wake-ups per long macrotask and
/// nothing while the room is idle.
struct Watchdog {
    shared: Arc<WatchShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct WatchShared {
    state: Mutex<WatchState>,
    wake: Condvar,
    /// Set by the watchdog when it terminated a macrotask.
    fired: AtomicBool,
}

#[derive(Default)]
struct WatchState {
    /// The CPU time (of the runtime's thread) past which the running macrotask is cut off.
    deadline: Option<Duration>,
    shutdown: bool,
}

impl Watchdog {
    fn start(isolate: v8::IsolateHandle) -> std::io::Result<Watchdog> {
        let clock = this_thread_cpu_clock()?;
        let shared = Arc::new(WatchShared {
            state: Mutex::new(WatchState::default()),
            wake: Condvar::new(),
            fired: AtomicBool::new(false),
        });
        let watched = shared.clone();
        let thread = std::thread::Builder::new()
            .name("js-watchdog".to_owned())
            // It only reads a clock and sleeps.
            .stack_size(64 * 1024)
            .spawn(move || watch(&watched, clock, &isolate))?;
        Ok(Watchdog { shared, thread: Some(thread) })
    }

    fn arm(&self, budget: Duration) {
        self.shared.fired.store(false, Ordering::Release);
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        state.deadline = Some(super::thread_cpu_time() + budget);
        self.shared.wake.notify_one();
    }

    /// Whether the budget ran out since `arm`. Once this returns, the watchdog will not
    /// terminate anything until the next `arm`: it fires only under the lock, while armed.
    fn disarm(&self) -> bool {
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        state.deadline = None;
        self.shared.fired.load(Ordering::Acquire)
    }

    fn fired(&self) -> bool {
        self.shared.fired.load(Ordering::Acquire)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner()).shutdown = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn watch(shared: &WatchShared, clock: nix::time::ClockId, isolate: &v8::IsolateHandle) {
    let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if state.shutdown {
            return;
        }
        let Some(deadline) = state.deadline else {
            state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        let used = nix::time::clock_gettime(clock).map(Duration::from).unwrap_or_default();
        if used >= deadline {
            shared.fired.store(true, Ordering::Release);
            isolate.terminate_execution();
            state.deadline = None;
            continue;
        }
        // At least a millisecond, so that a nearly spent budget is not a busy loop.
        let left = (deadline - used).max(Duration::from_millis(1));
        state = shared.wake.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
    }
}

/// The CPU clock of the calling thread, readable from another thread (the watchdog's).
fn this_thread_cpu_clock() -> std::io::Result<nix::time::ClockId> {
    let mut clock: nix::libc::clockid_t = 0;
    // SAFETY: pthread_self() is always a valid thread of this process, and `clock` is a valid
    // place for the result.
    let rc = unsafe { nix::libc::pthread_getcpuclockid(nix::libc::pthread_self(), &mut clock) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(nix::time::ClockId::from_raw(clock))
}

/// The prelude's hooks, each a function kept across calls.
struct Hooks {
    invoke: v8::Global<v8::Function>,
    deliver: v8::Global<v8::Function>,
    settle_host_call: v8::Global<v8::Function>,
    run_due_timer: v8::Global<v8::Function>,
    next_timer_at: v8::Global<v8::Function>,
    timer_watermark: v8::Global<v8::Function>,
    abandon_pending_calls: v8::Global<v8::Function>,
    stats: v8::Global<v8::Function>,
}

/// An argument to a hook.
enum Arg<'a> {
    Num(f64),
    Str(&'a str),
    Bool(bool),
}

/// Fields drop in declaration order: the hooks' handles before the isolate they live in.
pub struct Engine {
    hooks: Hooks,
    watchdog: Watchdog,
    runtime: RefCell<JsRuntime>,
    /// Set by the near-heap-limit callback: the running macrotask ran out of heap.
    out_of_memory: Rc<Cell<bool>>,
    heap_bytes: usize,
    cpu_limit: Duration,
    host: Rc<dyn Host>,
}

impl Engine {
    /// Creates the runtime, installs the API and evaluates the room script.
    pub fn start(
        room: &RoomInit<'_>,
        limits: &RuntimeLimits,
        host: Rc<dyn Host>,
    ) -> Result<Engine, ScriptError> {
        let heap_bytes = usize::try_from(limits.heap_bytes).unwrap_or(usize::MAX);
        let mut runtime = JsRuntime::new(RuntimeOptions {
            extensions: vec![roomvisor_natives::init()],
            create_params: Some(v8::CreateParams::default().heap_limits(0, heap_bytes)),
            ..Default::default()
        });
        runtime.op_state().borrow_mut().put(HostHandle(host.clone()));
        runtime.v8_isolate().set_promise_reject_callback(log_unhandled_rejection);

        let out_of_memory = Rc::new(Cell::new(false));
        stop_at_heap_limit(&mut runtime, &out_of_memory);
        let watchdog = Watchdog::start(runtime.v8_isolate().thread_safe_handle())
            .map_err(|e| ScriptError::exception(format!("engine setup: no CPU watchdog: {e}")))?;

        let cpu_limit = Duration::from_millis(limits.cpu_ms_per_call);
        watchdog.arm(cpu_limit);
        let hooks = install(&mut runtime, room, &out_of_memory, &watchdog, cpu_limit);
        let engine = hooks.map(|hooks| Engine {
            hooks,
            watchdog,
            runtime: RefCell::new(runtime),
            out_of_memory,
            heap_bytes,
            cpu_limit,
            host,
        });
        match engine {
            Ok(engine) => {
                engine.end_turn();
                Ok(engine)
            }
            Err(error) => Err(error),
        }
    }

    /// Invokes a top-level script function. The reply reaches the host now, or when the
    /// returned promise settles.
    pub fn call(&self, call_id: u64, function: &str, args_json: &str) {
        let outcome = self
            .turn(&self.hooks.invoke, &[Arg::Num(call_id as f64), Arg::Str(function), Arg::Str(args_json)]);
        if let Err(error) = outcome {
            self.host.reply(call_id, Err(error));
        }
    }

    /// Hands a BroadcastChannel message from another runtime to this one's listeners.
    pub fn deliver(&self, channel: &str, data_json: &str) {
        if let Err(error) = self.turn(&self.hooks.deliver, &[Arg::Str(channel), Arg::Str(data_json)]) {
            self.log_failure(&format!("BroadcastChannel(\"{channel}\") delivery"), &error);
        }
    }

    /// Resolves or rejects the promise of a `Beam.call`.
    pub fn settle_host_call(&self, id: u64, result: Result<String, String>) {
        let (ok, payload) = match result {
            Ok(json) => (true, json),
            Err(message) => (false, message),
        };
        let args = [Arg::Num(id as f64), Arg::Bool(ok), Arg::Str(&payload)];
        if let Err(error) = self.turn(&self.hooks.settle_host_call, &args) {
            self.log_failure("Beam.call continuation", &error);
        }
    }

    /// Runs every timer due now, each as its own macrotask with its own CPU budget.
    pub fn run_due_timers(&self) {
        let now = epoch_ms_f64();
        let id_limit = match self.turn(&self.hooks.timer_watermark, &[]) {
            Ok(limit) => limit.as_f64().unwrap_or_default(),
            Err(error) => return self.log_failure("timer bookkeeping", &error),
        };
        loop {
            match self.turn(&self.hooks.run_due_timer, &[Arg::Num(now), Arg::Num(id_limit)]) {
                Ok(ran) if ran.as_bool() == Some(true) => continue,
                Ok(_) => break,
                Err(error) => self.log_failure("timer callback", &error),
            }
        }
    }

    /// The runtime's heap in use, timers armed and calls not settled.
    pub fn stats(&self) -> WorkerStats {
        let heap_used_bytes = {
            let mut runtime = self.runtime.borrow_mut();
            u64::try_from(runtime.v8_isolate().get_heap_statistics().used_heap_size()).unwrap_or_default()
        };
        let counts = self.peek(&self.hooks.stats).unwrap_or_default();
        let count = |i: usize| counts.get(i).and_then(|n| n.as_u64()).and_then(|n| u32::try_from(n).ok());
        WorkerStats {
            heap_used_bytes,
            timers: count(0).unwrap_or_default(),
            pending: count(1).unwrap_or_default(),
        }
    }

    /// When the next timer is due, if any is armed.
    pub fn next_timer_at(&self) -> Option<Instant> {
        let at = self.peek(&self.hooks.next_timer_at).and_then(|at| at.as_f64()).unwrap_or(-1.0);
        timer_deadline(at)
    }

    /// A hook that only reads the prelude's bookkeeping: no budget, no microtasks.
    fn peek(&self, hook: &v8::Global<v8::Function>) -> Option<serde_json::Value> {
        let mut runtime = self.runtime.borrow_mut();
        call_hook(&mut runtime, hook, &[], &self.out_of_memory, &self.watchdog, self.cpu_limit).ok()
    }

    /// One macrotask: a fresh CPU budget, the task, then the microtasks it queued.
    fn turn(
        &self,
        hook: &v8::Global<v8::Function>,
        args: &[Arg<'_>],
    ) -> Result<serde_json::Value, ScriptError> {
        self.watchdog.arm(self.cpu_limit);
        let result = {
            let mut runtime = self.runtime.borrow_mut();
            call_hook(&mut runtime, hook, args, &self.out_of_memory, &self.watchdog, self.cpu_limit)
        };
        self.end_turn();
        result
    }

    /// Runs the microtasks the turn queued, under what is left of its budget, then clears
    /// whatever a cut-off left behind so the next turn starts afresh.
    fn end_turn(&self) {
        let mut cut_off = false;
        // A macrotask that was terminated leaves its microtasks queued for the next turn:
        // running them now, still terminating, would only drop them.
        if !self.watchdog.fired() && !self.out_of_memory.get() {
            let mut runtime = self.runtime.borrow_mut();
            runtime.v8_isolate().perform_microtask_checkpoint();
            // Terminated inside the checkpoint: V8 drops the microtasks still queued, and
            // with them any call's continuation.
            cut_off = self.watchdog.fired();
        }
        let fired = self.watchdog.disarm();
        let out_of_memory = self.out_of_memory.replace(false);
        if fired || out_of_memory {
            let mut runtime = self.runtime.borrow_mut();
            runtime.v8_isolate().cancel_terminate_execution();
            if out_of_memory {
                // What the terminated script held is garbage now; collect it, then put back
                // the limit that the near-heap-limit callback raised.
                runtime.v8_isolate().low_memory_notification();
                reset_heap_limit(&mut runtime, self.heap_bytes, &self.out_of_memory);
            }
        }
        if cut_off {
            self.abandon_pending_calls();
        }
    }

    /// A promise job cut off by the CPU budget may have been the continuation of any pending
    /// async call, and that call's promise will never settle: answer them all with a timeout
    /// rather than leave a caller waiting until the worker is killed as unresponsive.
    fn abandon_pending_calls(&self) {
        let abandoned = {
            let mut runtime = self.runtime.borrow_mut();
            let hook = &self.hooks.abandon_pending_calls;
            call_hook(&mut runtime, hook, &[], &self.out_of_memory, &self.watchdog, self.cpu_limit)
        };
        match abandoned {
            Ok(serde_json::Value::Array(ids)) => {
                for id in ids.iter().filter_map(serde_json::Value::as_f64) {
                    self.host.reply(id as u64, Err(timeout_error(self.cpu_limit)));
                }
            }
            Ok(other) => {
                self.host.log(LogLevel::Error, &format!("abandoning pending calls returned {other}"))
            }
            Err(e) => self.log_failure("abandoning pending calls", &e),
        }
    }

    fn log_failure(&self, what: &str, error: &ScriptError) {
        log_failure(&*self.host, what, error);
    }
}

/// Puts the heap limit back to the room's own after an out-of-memory raised it (on V8).
fn reset_heap_limit(runtime: &mut JsRuntime, heap_bytes: usize, out_of_memory: &Rc<Cell<bool>>) {
    runtime.remove_near_heap_limit_callback(heap_bytes);
    stop_at_heap_limit(runtime, out_of_memory);
}

/// At the heap limit: stop the script, flag it, and lend it what `unwind_allowance` says to
/// unwind in. The limit goes back after the macrotask (`reset_heap_limit`).
fn stop_at_heap_limit(runtime: &mut JsRuntime, out_of_memory: &Rc<Cell<bool>>) {
    let flag = out_of_memory.clone();
    let isolate = runtime.v8_isolate().thread_safe_handle();
    runtime.add_near_heap_limit_callback(move |current, _initial| {
        flag.set(true);
        isolate.terminate_execution();
        current + unwind_allowance(current)
    });
}

/// Real V8 aborts the process when the callback leaves the limit where it is, and acts on
/// `terminate_execution` at the next stack check (every loop back-edge and call): lend half
/// as much again, which the script stops long before it can use.
#[cfg(feature = "v8")]
fn unwind_allowance(current: usize) -> usize {
    current / 2
}

/// deno_core's QuickJS backend (v8x) lends nothing. There the callback runs from QuickJS's
/// allocator when an allocation would pass the limit (plus v8x's own headroom of an eighth),
/// and `terminate_execution` only sets a flag that QuickJS's interrupt handler reads once
/// every 10,000 interpreter ticks (back-edges and calls). A script allocating a megabyte a
/// tick therefore ran on for thousands of megabytes: every loan was used up, the callback ran
/// again and lent more (32 MiB grew to over a gigabyte in ten rounds), until the CPU watchdog
/// answered "timeout". Lending nothing makes the allocation fail, as at QuickJS's own memory
/// limit: it throws QuickJS's "out of memory" error, which unwinds the script at once and
/// frees what it held, while the termination keeps it from catching the error and going on.
#[cfg(not(feature = "v8"))]
fn unwind_allowance(_current: usize) -> usize {
    0
}

/// Evaluates the natives' bootstrap, the prelude and the room script; returns the hooks.
fn install(
    runtime: &mut JsRuntime,
    room: &RoomInit<'_>,
    out_of_memory: &Cell<bool>,
    watchdog: &Watchdog,
    cpu_limit: Duration,
) -> Result<Hooks, ScriptError> {
    let setup_error = |what: &str| ScriptError::exception(format!("engine setup: {what}"));
    deno_core::scope!(scope, runtime);
    v8::tc_scope!(let tc, scope);
    let fail = |tc: &mut v8::PinnedRef<'_, v8::TryCatch<v8::HandleScope>>| {
        caught(tc, out_of_memory, watchdog, cpu_limit)
    };

    let Some(natives) = run_script(tc, "natives.js", NATIVES) else { return Err(fail(tc)) };
    let Some(prelude) = run_script(tc, "prelude.js", PRELUDE) else { return Err(fail(tc)) };
    let prelude = v8::Local::<v8::Function>::try_from(prelude)
        .map_err(|_| setup_error("the prelude is no function"))?;
    let durable = match &room.storage {
        Some(durable) => durable_value(tc, durable).ok_or_else(|| setup_error("storage does not convert"))?,
        None => v8::undefined(tc).into(),
    };
    let args = [
        natives,
        string(tc, room.room_id)?,
        string(tc, room.kind)?,
        string(tc, room.settings_json)?,
        v8::Number::new(tc, room.epoch as f64).into(),
        durable,
    ];
    let undefined = v8::undefined(tc).into();
    let Some(hooks) = prelude.call(tc, undefined, &args) else { return Err(fail(tc)) };
    let hooks =
        v8::Local::<v8::Object>::try_from(hooks).map_err(|_| setup_error("the prelude returned no hooks"))?;
    if run_script(tc, room.script_name, room.script).is_none() {
        let error = fail(tc);
        return Err(with_location(tc, error));
    }

    let mut hook = |name: &str| -> Result<v8::Global<v8::Function>, ScriptError> {
        let key = string(tc, name)?;
        let value = hooks.get(tc, key).ok_or_else(|| setup_error(name))?;
        let function = v8::Local::<v8::Function>::try_from(value).map_err(|_| setup_error(name))?;
        Ok(v8::Global::new(tc, function))
    };
    Ok(Hooks {
        invoke: hook("invoke")?,
        deliver: hook("deliver")?,
        settle_host_call: hook("settleHostCall")?,
        run_due_timer: hook("runDueTimer")?,
        next_timer_at: hook("nextTimerAt")?,
        timer_watermark: hook("timerWatermark")?,
        abandon_pending_calls: hook("abandonPendingCalls")?,
        stats: hook("stats")?,
    })
}

/// Compiles and runs a classic script under `name`, as the script's stack traces show it.
fn run_script<'s>(
    tc: &mut v8::PinnedRef<'s, v8::TryCatch<v8::HandleScope>>,
    name: &str,
    source: &str,
) -> Option<v8::Local<'s, v8::Value>> {
    let name = v8::String::new(tc, name)?;
    let source = v8::String::new(tc, source)?;
    let origin = v8::ScriptOrigin::new(tc, name.into(), 0, 0, false, 0, None, false, false, false, None);
    let script = v8::Script::compile(tc, source, Some(&origin))?;
    script.run(tc)
}

fn string<'s>(scope: &mut v8::PinScope<'s, '_>, text: &str) -> Result<v8::Local<'s, v8::Value>, ScriptError> {
    v8::String::new(scope, text)
        .map(Into::into)
        .ok_or_else(|| ScriptError::exception("engine setup: a string too long for the engine".to_owned()))
}

/// The prelude's view of a durable room's storage: keys and values as two arrays (the values
/// stay JSON text until read), its alarm (-1 for none) and its size limit.
fn durable_value<'s>(
    scope: &mut v8::PinScope<'s, '_>,
    durable: &Durable,
) -> Option<v8::Local<'s, v8::Value>> {
    let (keys, values): (Vec<&str>, Vec<&str>) =
        durable.entries.iter().map(|(k, v)| (k.as_str(), v.as_str())).unzip();
    let object = serde_json::json!({
        "keys": keys,
        "values": values,
        "alarmAt": durable.alarm_at.map_or(-1.0, |at| at as f64),
        "maxBytes": durable.max_bytes as f64,
    });
    serde_v8::to_v8(scope, object).ok()
}

/// Calls one hook; its result as JSON (numbers, booleans and arrays of them are all the
/// hooks return).
fn call_hook(
    runtime: &mut JsRuntime,
    hook: &v8::Global<v8::Function>,
    args: &[Arg<'_>],
    out_of_memory: &Cell<bool>,
    watchdog: &Watchdog,
    cpu_limit: Duration,
) -> Result<serde_json::Value, ScriptError> {
    deno_core::scope!(scope, runtime);
    v8::tc_scope!(let tc, scope);
    let mut locals = Vec::with_capacity(args.len());
    for arg in args {
        locals.push(match arg {
            Arg::Num(n) => v8::Number::new(tc, *n).into(),
            Arg::Bool(b) => v8::Boolean::new(tc, *b).into(),
            Arg::Str(s) => string(tc, s)?,
        });
    }
    let function = v8::Local::new(tc, hook);
    let undefined = v8::undefined(tc).into();
    match function.call(tc, undefined, &locals) {
        Some(value) => Ok(serde_v8::from_v8(tc, value).unwrap_or(serde_json::Value::Null)),
        None => Err(caught(tc, out_of_memory, watchdog, cpu_limit)),
    }
}

/// What the try-catch scope caught, as the gateway reports it.
fn caught(
    tc: &mut v8::PinnedRef<'_, v8::TryCatch<v8::HandleScope>>,
    out_of_memory: &Cell<bool>,
    watchdog: &Watchdog,
    cpu_limit: Duration,
) -> ScriptError {
    if watchdog.fired() {
        return timeout_error(cpu_limit);
    }
    if out_of_memory.get() {
        return ScriptError {
            kind: ScriptErrorKind::OutOfMemory,
            message: "out of memory".to_owned(),
            stack: None,
        };
    }
    let Some(exception) = tc.exception() else {
        return ScriptError::exception("execution terminated".to_owned());
    };
    let Some(object) = exception.to_object(tc).filter(|_| exception.is_object()) else {
        return ScriptError::exception(exception.to_rust_string_lossy(tc));
    };
    let property = |name: &str| -> Option<String> {
        let key = v8::String::new(tc, name)?;
        let value = object.get(tc, key.into())?;
        (!value.is_undefined() && !value.is_null()).then(|| value.to_rust_string_lossy(tc))
    };
    let message = property("message").unwrap_or_else(|| "exception".to_owned());
    let name = property("name");
    let stack = property("stack");
    let kind = classify_message(&message);
    let message = match name {
        Some(name) if !name.is_empty() => format!("{name}: {message}"),
        _ => message,
    };
    ScriptError { kind, message, stack }
}

/// Start-up errors are read by whoever fixes the script: name where, e.g.
/// `SyntaxError: Unexpected token '{' (at room.js:1:18)`, from the message V8 keeps with
/// the exception (a syntax error has no stack frame to read it from).
fn with_location(
    tc: &mut v8::PinnedRef<'_, v8::TryCatch<v8::HandleScope>>,
    mut error: ScriptError,
) -> ScriptError {
    if error.kind != ScriptErrorKind::Exception {
        return error;
    }
    let Some(message) = tc.message() else { return error };
    let file =
        message.get_script_resource_name(tc).map(|name| name.to_rust_string_lossy(tc)).unwrap_or_default();
    let line = message.get_line_number(tc).unwrap_or_default();
    let column = message.get_start_column() + 1;
    error.message = format!("{} (at {file}:{line}:{column})", error.message);
    error
}

/// Logs a promise rejected with no handler, as the QuickJS backend's rejection tracker does.
extern "C" fn log_unhandled_rejection(message: v8::PromiseRejectMessage) {
    if message.get_event() != v8::PromiseRejectEvent::PromiseRejectWithNoHandler {
        return;
    }
    // SAFETY: a callback scope can be made from the message V8 hands the callback.
    v8::callback_scope!(unsafe scope, &message);
    let text = match message.get_value() {
        Some(value) if value.is_object() => {
            let key = v8::String::new(scope, "message");
            let object = value.to_object(scope);
            match (key, object) {
                (Some(key), Some(object)) => object
                    .get(scope, key.into())
                    .map(|m| m.to_rust_string_lossy(scope))
                    .unwrap_or_else(|| value.to_rust_string_lossy(scope)),
                _ => value.to_rust_string_lossy(scope),
            }
        }
        Some(value) => value.to_rust_string_lossy(scope),
        None => "undefined".to_owned(),
    };
    let state = JsRuntime::op_state_from(scope);
    let Ok(state) = state.try_borrow() else { return };
    if let Some(handle) = state.try_borrow::<HostHandle>() {
        handle.0.log(LogLevel::Error, &format!("unhandled promise rejection: {text}"));
    }
}
