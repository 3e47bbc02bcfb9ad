//! The QuickJS backend, through `rquickjs`: the default engine.

use std::rc::Rc;
use std::time::{Duration, Instant};

use rquickjs::context::EvalOptions;
use rquickjs::{CatchResultExt, Context, Function, Object, Persistent, Runtime};

use super::errors::{describe_value, script_error_from_value, to_script_error, with_location};
use super::natives::natives;
use super::{
    epoch_ms_f64, log_failure, timeout_error, timer_deadline, CpuBudget, Durable, Host, RoomInit, PRELUDE,
};
use crate::wire::{LogLevel, RuntimeLimits, ScriptError, ScriptErrorKind, WorkerStats};
/// Deep recursion must end in a RangeError, not a segfault of the worker's 8 MiB main stack; half
/// of it still lets JSON.parse take any payload the gateway accepts (128 levels), even unoptimised.
const MAX_JS_STACK_BYTES: usize = 4 * 1024 * 1024;

/// The prelude's view of a durable room's storage: keys and values as two arrays (the values
/// stay JSON text until read), its alarm (-1 for none) and its size limit.
fn durable_object<'js>(ctx: &rquickjs::Ctx<'js>, durable: &Durable) -> rquickjs::Result<Object<'js>> {
    let object = Object::new(ctx.clone())?;
    let keys = rquickjs::Array::new(ctx.clone())?;
    let values = rquickjs::Array::new(ctx.clone())?;
    for (i, (key, value)) in durable.entries.iter().enumerate() {
        keys.set(i, key.as_str())?;
        values.set(i, value.as_str())?;
    }
    object.set("keys", keys)?;
    object.set("values", values)?;
    object.set("alarmAt", durable.alarm_at.map_or(-1.0, |at| at as f64))?;
    object.set("maxBytes", durable.max_bytes as f64)?;
    Ok(object)
}

/// Fields drop in declaration order, and QuickJS asserts that no object outlives its runtime:
/// the hooks go first, the runtime last.
pub struct Engine {
    hooks: Persistent<Object<'static>>,
    context: Context,
    runtime: Runtime,
    budget: Rc<CpuBudget>,
    host: Rc<dyn Host>,
}

/// A runtime with its limits set, the natives made and the prelude evaluated: everything
/// but the room. The gateway's warm workers wait like this, and the pool's template forks
/// copies of one (see `worker::template`). Fields drop in order, the runtime last.
pub struct Prepared {
    install: Persistent<Function<'static>>,
    natives: Persistent<Object<'static>>,
    context: Context,
    runtime: Runtime,
    budget: Rc<CpuBudget>,
    host: Rc<dyn Host>,
}

fn setup_error(e: rquickjs::Error) -> ScriptError {
    ScriptError::exception(format!("engine setup: {e}"))
}

impl Prepared {
    pub fn new(limits: &RuntimeLimits, host: Rc<dyn Host>) -> Result<Prepared, ScriptError> {
        let runtime = Runtime::new().map_err(setup_error)?;
        runtime.set_memory_limit(usize::try_from(limits.heap_bytes).unwrap_or(usize::MAX));
        runtime.set_max_stack_size(MAX_JS_STACK_BYTES);
        let budget = Rc::new(CpuBudget::new(Duration::from_millis(limits.cpu_ms_per_call)));
        let interrupt_budget = budget.clone();
        runtime.set_interrupt_handler(Some(Box::new(move || interrupt_budget.should_interrupt())));
        let rejection_host = host.clone();
        runtime.set_host_promise_rejection_tracker(Some(Box::new(
            move |_ctx, _promise, reason, is_handled| {
                if !is_handled {
                    let message = describe_value(&reason);
                    rejection_host.log(LogLevel::Error, &format!("unhandled promise rejection: {message}"));
                }
            },
        )));
        let context = Context::full(&runtime).map_err(setup_error)?;
        budget.start();
        let compiled = context.with(|ctx| -> Result<_, ScriptError> {
            let natives = natives(&ctx, host.clone()).map_err(setup_error)?;
            let install: Function = ctx
                .eval_with_options(PRELUDE, eval_options("prelude.js", true))
                .catch(&ctx)
                .map_err(|e| to_script_error(e, &budget))?;
            Ok((Persistent::save(&ctx, install), Persistent::save(&ctx, natives)))
        });
        budget.stop();
        let (install, natives) = compiled?;
        Ok(Prepared { install, natives, context, runtime, budget, host })
    }

    /// Binds the API to the room and evaluates the room script.
    pub fn start(self, room: &RoomInit<'_>) -> Result<Engine, ScriptError> {
        // Locals drop in reverse: the context before the runtime, as QuickJS requires should
        // the script fail.
        let Prepared { install, natives, runtime, context, budget, host } = self;
        budget.start();
        let hooks = context.with(|ctx| -> Result<_, ScriptError> {
            let install = install.restore(&ctx).map_err(setup_error)?;
            let natives = natives.restore(&ctx).map_err(setup_error)?;
            let durable = match &room.storage {
                Some(durable) => Some(durable_object(&ctx, durable).map_err(setup_error)?),
                None => None,
            };
            let hooks: Object = install
                .call((natives, room.room_id, room.kind, room.settings_json, room.epoch as f64, durable))
                .catch(&ctx)
                .map_err(|e| to_script_error(e, &budget))?;
            ctx.eval_with_options::<(), _>(room.script, eval_options(room.script_name, false))
                .catch(&ctx)
                .map_err(|e| with_location(to_script_error(e, &budget)))?;
            Ok(Persistent::save(&ctx, hooks))
        });
        let engine = Engine { hooks: hooks?, context, runtime, budget, host };
        engine.run_jobs();
        engine.budget.stop();
        Ok(engine)
    }
}

impl Engine {
    /// Invokes a top-level script function. The reply reaches the host now, or when the
    /// returned promise settles.
    pub fn call(&self, call_id: u64, function: &str, args_json: &str) {
        let outcome = self.turn(|hooks| {
            let invoke: Function = hooks.get("invoke")?;
            invoke.call::<_, ()>((call_id as f64, function, args_json))
        });
        if let Err(error) = outcome {
            self.host.reply(call_id, Err(error));
        }
    }

    /// Hands a BroadcastChannel message from another runtime to this one's listeners.
    pub fn deliver(&self, channel: &str, data_json: &str) {
        if let Err(error) = self.turn(|hooks| {
            let deliver: Function = hooks.get("deliver")?;
            deliver.call::<_, ()>((channel, data_json))
        }) {
            self.log_failure(&format!("BroadcastChannel(\"{channel}\") delivery"), &error);
        }
    }

    /// Resolves or rejects the promise of a `Beam.call`.
    pub fn settle_host_call(&self, id: u64, result: Result<String, String>) {
        let (ok, payload) = match result {
            Ok(json) => (true, json),
            Err(message) => (false, message),
        };
        if let Err(error) = self.turn(|hooks| {
            let settle: Function = hooks.get("settleHostCall")?;
            settle.call::<_, ()>((id as f64, ok, payload))
        }) {
            self.log_failure("Beam.call continuation", &error);
        }
    }

    /// Runs every timer due now, each as its own macrotask with its own CPU budget.
    pub fn run_due_timers(&self) {
        let now = epoch_ms_f64();
        let id_limit = match self.turn(|hooks| {
            let watermark: Function = hooks.get("timerWatermark")?;
            watermark.call::<_, f64>(())
        }) {
            Ok(limit) => limit,
            Err(error) => return self.log_failure("timer bookkeeping", &error),
        };
        loop {
            let ran = self.turn(|hooks| {
                let run: Function = hooks.get("runDueTimer")?;
                run.call::<_, bool>((now, id_limit))
            });
            match ran {
                Ok(true) => continue,
                Ok(false) => break,
                Err(error) => self.log_failure("timer callback", &error),
            }
        }
    }

    /// The runtime's heap in use, timers armed and calls not settled.
    pub fn stats(&self) -> WorkerStats {
        let heap_used_bytes = u64::try_from(self.runtime.memory_usage().memory_used_size).unwrap_or_default();
        let counts = self.context.with(|ctx| -> rquickjs::Result<Vec<u32>> {
            let hooks = self.hooks.clone().restore(&ctx)?;
            let stats: Function = hooks.get("stats")?;
            stats.call(())
        });
        let counts = counts.unwrap_or_default();
        let count = |i: usize| counts.get(i).copied().unwrap_or_default();
        WorkerStats { heap_used_bytes, timers: count(0), pending: count(1) }
    }

    /// When the next timer is due, if any is armed.
    pub fn next_timer_at(&self) -> Option<Instant> {
        let at = self
            .context
            .with(|ctx| -> rquickjs::Result<f64> {
                let hooks = self.hooks.clone().restore(&ctx)?;
                let next: Function = hooks.get("nextTimerAt")?;
                next.call(())
            })
            .unwrap_or(-1.0);
        timer_deadline(at)
    }

    /// One macrotask: a fresh CPU budget, the task, then the microtasks it queued.
    fn turn<T>(
        &self,
        task: impl for<'js> FnOnce(Object<'js>) -> rquickjs::Result<T>,
    ) -> Result<T, ScriptError> {
        self.budget.start();
        let result = self.context.with(|ctx| {
            let hooks =
                self.hooks.clone().restore(&ctx).catch(&ctx).map_err(|e| to_script_error(e, &self.budget))?;
            task(hooks).catch(&ctx).map_err(|e| to_script_error(e, &self.budget))
        });
        let cut_off = self.run_jobs();
        self.budget.stop();
        if cut_off {
            self.abandon_pending_calls();
        }
        result
    }

    /// Runs the queued promise jobs; true if the CPU budget cut one off.
    fn run_jobs(&self) -> bool {
        let mut cut_off = false;
        loop {
            match self.runtime.execute_pending_job() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(job) => {
                    let error = job.0.with(|ctx| {
                        let caught = ctx.catch();
                        script_error_from_value(&caught, &self.budget)
                    });
                    cut_off |= error.kind == ScriptErrorKind::Timeout;
                    self.log_failure("promise job", &error);
                }
            }
        }
        cut_off
    }

    /// A promise job cut off by the CPU budget may have been the continuation of any pending
    /// async call, and that call's promise will never settle: answer them all with a timeout
    /// rather than leave a caller waiting until the worker is killed as unresponsive.
    fn abandon_pending_calls(&self) {
        let abandoned = self.context.with(|ctx| -> rquickjs::Result<Vec<f64>> {
            let hooks = self.hooks.clone().restore(&ctx)?;
            let abandon: Function = hooks.get("abandonPendingCalls")?;
            abandon.call(())
        });
        match abandoned {
            Ok(ids) => {
                for id in ids {
                    self.host.reply(id as u64, Err(timeout_error(self.budget.limit)));
                }
            }
            Err(e) => self.host.log(LogLevel::Error, &format!("abandoning pending calls failed: {e}")),
        }
    }

    fn log_failure(&self, what: &str, error: &ScriptError) {
        log_failure(&*self.host, what, error);
    }
}

fn eval_options(filename: &str, strict: bool) -> EvalOptions {
    let mut options = EvalOptions::default();
    options.global = true;
    options.strict = strict;
    options.filename = Some(filename.to_owned());
    options
}
