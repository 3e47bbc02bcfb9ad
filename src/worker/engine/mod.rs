//! The JavaScript engine behind a room: QuickJS through `rquickjs` (the default build), or,
//! built with the cargo feature `deno` (or `v8`), deno_core (design section 11).
//!
//! One build has one engine. deno_core's QuickJS backend (v8x) links its own, patched
//! QuickJS-ng 0.15 with the same C symbols (`JS_NewNumber`, ...) as rquickjs's QuickJS-ng
//! 0.16, and a binary with both fails to link on duplicate symbols; with the QuickJS backend
//! compiled out, rquickjs's objects are never pulled from their archive.
//!
//! This is the only module that knows which engine runs the room script. The rest of the
//! worker talks to [`Engine`] and implements [`Host`]; each backend implements the same API
//! and evaluates the same `prelude.js`, so the script API is one piece of JavaScript whatever
//! runs it.

#[cfg(not(any(feature = "deno", feature = "v8")))]
use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::wire::{EngineKind, LogLevel, RuntimeLimits, ScriptError, ScriptErrorKind, WorkerStats};

#[cfg(any(feature = "deno", feature = "v8"))]
mod deno;
#[cfg(not(any(feature = "deno", feature = "v8")))]
mod errors;
#[cfg(not(any(feature = "deno", feature = "v8")))]
mod natives;
#[cfg(not(any(feature = "deno", feature = "v8")))]
mod quickjs;
#[cfg(test)]
mod tests;

const PRELUDE: &str = include_str!("prelude.js");

/// What a runtime needs from the process around it.
pub trait Host {
    /// `Beam.callSync`: blocks until the gateway answers. `Ok` holds JSON.
    fn host_call_sync(&self, name: &str, args_json: &str) -> Result<String, String>;
    /// `Beam.call`: returns the id that a later [`Engine::settle_host_call`] answers.
    fn host_call_async(&self, name: &str, args_json: &str) -> u64;
    fn post(&self, channel: &str, data_json: &str);
    /// `Room.push`: an event for one join.
    fn push(&self, conn: &str, event: &str, payload_json: &str);
    /// `Room.broadcast`: an event for every join but `except`.
    fn broadcast(&self, event: &str, payload_json: &str, except: Vec<String>);
    /// `Room.presence.track` / `untrack`.
    fn track(&self, conn: &str, key: &str, meta_json: &str);
    fn untrack(&self, conn: &str);
    fn subscribe(&self, channel: &str);
    fn unsubscribe(&self, channel: &str);
    fn log(&self, level: LogLevel, message: &str);
    /// `Room.storage.put`: `stored_bytes` is what the room holds with it. Fails when one turn
    /// writes more than a frame can carry.
    fn storage_put(&self, key: &str, value_json: &str, stored_bytes: u64) -> Result<(), String>;
    fn storage_delete(&self, key: &str, stored_bytes: u64);
    /// `Room.setAlarm` / `Room.deleteAlarm` (`None`).
    fn set_alarm(&self, at: Option<u64>);
    /// The outcome of [`Engine::call`], possibly after the call's promise settled.
    fn reply(&self, call_id: u64, result: Result<String, ScriptError>);
}

/// What a room's runtime is started with.
pub struct RoomInit<'a> {
    pub room_id: &'a str,
    pub kind: &'a str,
    pub script_name: &'a str,
    pub script: &'a str,
    /// `Room.settings`, as JSON.
    pub settings_json: &'a str,
    pub epoch: u64,
    /// A durable room's storage, as stored; `None` for a transient room.
    pub storage: Option<Durable>,
}

/// A durable room's storage as the runtime starts with it.
pub struct Durable {
    pub alarm_at: Option<u64>,
    pub max_bytes: u64,
    /// Keys and JSON values.
    pub entries: Vec<(String, String)>,
}

/// A room's runtime, on the engine this build has.
pub enum Engine {
    #[cfg(not(any(feature = "deno", feature = "v8")))]
    Quickjs(quickjs::Engine),
    #[cfg(any(feature = "deno", feature = "v8"))]
    Deno(deno::Engine),
}

/// The same method of whichever backend runs the room.
macro_rules! each_backend {
    ($engine:expr, $backend:ident => $body:expr) => {
        match $engine {
            #[cfg(not(any(feature = "deno", feature = "v8")))]
            Engine::Quickjs($backend) => $body,
            #[cfg(any(feature = "deno", feature = "v8"))]
            Engine::Deno($backend) => $body,
        }
    };
}

/// An engine made ready before its room is known: the runtime up, its limits set and the
/// prelude compiled. What is left for [`Prepared::start`] is the room's own part: binding
/// the API to the room and evaluating its script.
pub enum Prepared {
    #[cfg(not(any(feature = "deno", feature = "v8")))]
    Quickjs(quickjs::Prepared),
    /// deno_core's runtime runs a watchdog thread, and a prepared one could only be forked
    /// with that thread lost: its start waits for the room.
    #[cfg(any(feature = "deno", feature = "v8"))]
    Deno { limits: RuntimeLimits, host: Rc<dyn Host> },
}

impl Prepared {
    /// Binds the API to the room and evaluates the room script.
    pub fn start(self, room: &RoomInit<'_>) -> Result<Engine, ScriptError> {
        match self {
            #[cfg(not(any(feature = "deno", feature = "v8")))]
            Prepared::Quickjs(prepared) => prepared.start(room).map(Engine::Quickjs),
            #[cfg(any(feature = "deno", feature = "v8"))]
            Prepared::Deno { limits, host } => deno::Engine::start(room, &limits, host).map(Engine::Deno),
        }
    }
}

impl Engine {
    /// Creates the runtime, installs the API and evaluates the room script.
    #[cfg(test)]
    pub fn start(
        room: &RoomInit<'_>,
        limits: &RuntimeLimits,
        host: Rc<dyn Host>,
    ) -> Result<Engine, ScriptError> {
        Engine::prepare(limits, host)?.start(room)
    }

    /// Everything of a start that does not depend on the room.
    pub fn prepare(limits: &RuntimeLimits, host: Rc<dyn Host>) -> Result<Prepared, ScriptError> {
        // The gateway refuses an engine its build lacks; a worker of another build (through
        // --worker-bin) could still be handed one.
        if limits.engine != EngineKind::BUILT {
            return Err(ScriptError::exception(format!(
                "this room-worker was built with the {} engine only, not {}",
                EngineKind::BUILT,
                limits.engine
            )));
        }
        #[cfg(not(any(feature = "deno", feature = "v8")))]
        return quickjs::Prepared::new(limits, host).map(Prepared::Quickjs);
        #[cfg(any(feature = "deno", feature = "v8"))]
        return Ok(Prepared::Deno { limits: *limits, host });
    }

    /// Invokes a top-level script function. The reply reaches the host now, or when the
    /// returned promise settles.
    pub fn call(&self, call_id: u64, function: &str, args_json: &str) {
        each_backend!(self, e => e.call(call_id, function, args_json))
    }

    /// Hands a BroadcastChannel message from another runtime to this one's listeners.
    pub fn deliver(&self, channel: &str, data_json: &str) {
        each_backend!(self, e => e.deliver(channel, data_json))
    }

    /// Resolves or rejects the promise of a `Beam.call`.
    pub fn settle_host_call(&self, id: u64, result: Result<String, String>) {
        each_backend!(self, e => e.settle_host_call(id, result))
    }

    /// Runs every timer due now, each as its own macrotask with its own CPU budget.
    pub fn run_due_timers(&self) {
        each_backend!(self, e => e.run_due_timers())
    }

    /// The runtime's heap in use, timers armed and calls not settled.
    pub fn stats(&self) -> WorkerStats {
        each_backend!(self, e => e.stats())
    }

    /// When the next timer is due, if any is armed.
    pub fn next_timer_at(&self) -> Option<Instant> {
        each_backend!(self, e => e.next_timer_at())
    }
}

/// CPU time (not wall time: a blocking host call costs nothing) allowed to one macrotask.
#[cfg(not(any(feature = "deno", feature = "v8")))]
struct CpuBudget {
    limit: Duration,
    deadline: Cell<Option<Duration>>,
    exceeded: Cell<bool>,
}

#[cfg(not(any(feature = "deno", feature = "v8")))]
impl CpuBudget {
    fn new(limit: Duration) -> CpuBudget {
        CpuBudget { limit, deadline: Cell::new(None), exceeded: Cell::new(false) }
    }

    fn start(&self) {
        self.exceeded.set(false);
        self.deadline.set(Some(thread_cpu_time() + self.limit));
    }

    fn stop(&self) {
        self.deadline.set(None);
    }

    fn should_interrupt(&self) -> bool {
        match self.deadline.get() {
            Some(deadline) if thread_cpu_time() > deadline => {
                self.exceeded.set(true);
                true
            }
            _ => false,
        }
    }
}

fn thread_cpu_time() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

fn classify_message(message: &str) -> ScriptErrorKind {
    if message == "out of memory" {
        ScriptErrorKind::OutOfMemory
    } else {
        ScriptErrorKind::Exception
    }
}

fn timeout_error(limit: Duration) -> ScriptError {
    ScriptError {
        kind: ScriptErrorKind::Timeout,
        message: format!("script ran past its CPU budget of {} ms", limit.as_millis()),
        stack: None,
    }
}

fn log_failure(host: &dyn Host, what: &str, error: &ScriptError) {
    let stack = error.stack.as_deref().map(|s| format!("\n{s}")).unwrap_or_default();
    host.log(LogLevel::Error, &format!("{what} failed: {}{stack}", error.message));
}

/// The clock the prelude's timers use (`Date.now()`), as the float JavaScript numbers are.
fn epoch_ms_f64() -> f64 {
    crate::util::epoch_ms() as f64
}

/// Turns the prelude's `nextTimerAt` (epoch ms, negative for none) into a deadline.
fn timer_deadline(at: f64) -> Option<Instant> {
    if at < 0.0 {
        return None;
    }
    let wait_ms = (at - epoch_ms_f64()).max(0.0);
    Some(Instant::now() + Duration::from_secs_f64(wait_ms / 1000.0))
}
