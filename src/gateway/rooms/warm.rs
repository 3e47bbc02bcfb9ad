//! The warm pool (`--warm-workers`): worker processes started and prepared before any room
//! asks for them, so that a new room costs a `Start` frame instead of an exec and an engine
//! start-up. Rooms still start lazily; the pool holds processes, not rooms: a spare is no
//! room (`/api/rooms` does not list it) until the launcher takes it, and `/healthz` counts
//! the spares.
//!
//! Spares come from the template (`spawn::Template`, a prepared worker that forks prepared
//! copies of itself) where the engine can be forked, else from exec. A burst larger than the
//! pool forks from the template on the spot rather than waiting for the refill.
//!
//! The pool's own thread refills it, and it also starts the template and every exec'd spare:
//! a worker's parent-death signal follows the thread that started it (forks of the template
//! the template's starter), so that thread must live as long as the gateway. It never ends;
//! once the pool closes it only waits.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::spawn::{exec_worker, NewWorker, Template, WorkerCommand};
use crate::util::LockExt;
use crate::wire::{RuntimeLimits, ToWorker};

/// How often the pool looks for spares that died while waiting (an operator's `kill`).
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Pauses after a failed refill, doubling up to the last (a missing executable, no
/// descriptors left): the pool must not spin.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

pub(crate) struct WarmPool {
    shared: Arc<Shared>,
}

struct Shared {
    target: usize,
    command: WorkerCommand,
    limits: RuntimeLimits,
    spares: Mutex<VecDeque<NewWorker>>,
    /// Signalled when a spare is taken or the pool closes.
    changed: Condvar,
    /// Started and restarted by the pool's thread only; forked from by any.
    template: Mutex<Option<Template>>,
    closed: AtomicBool,
}

impl WarmPool {
    /// Starts the pool's thread, which fills it; `None` for `size` 0.
    pub fn start(size: usize, command: WorkerCommand, limits: RuntimeLimits) -> Option<WarmPool> {
        if size == 0 {
            return None;
        }
        let shared = Arc::new(Shared {
            target: size,
            command,
            limits,
            spares: Mutex::new(VecDeque::with_capacity(size)),
            changed: Condvar::new(),
            template: Mutex::new(None),
            closed: AtomicBool::new(false),
        });
        let refiller = shared.clone();
        let started =
            std::thread::Builder::new().name("warm-pool".to_owned()).spawn(move || refiller.refill());
        if let Err(e) = started {
            tracing::error!("cannot start the warm pool's thread, rooms start cold: {e}");
            return None;
        }
        Some(WarmPool { shared })
    }

    /// A prepared worker for a new room: a spare, else a fresh fork of the template; `None`
    /// when neither is to be had (the caller execs one).
    pub fn take(&self) -> Option<NewWorker> {
        let shared = &self.shared;
        if shared.closed.load(Ordering::SeqCst) {
            return None;
        }
        loop {
            let spare = shared.spares.lock_or_recover().pop_front();
            let Some(mut spare) = spare else { break };
            shared.changed.notify_one();
            // A spare killed while it waited is reaped here, never handed to a room.
            if matches!(spare.process.try_wait(), Ok(None)) {
                return Some(spare);
            }
        }
        shared.fork()
    }

    /// Spares waiting now.
    pub fn spares(&self) -> usize {
        self.shared.spares.lock_or_recover().len()
    }
}

impl WarmPool {
    /// Kills the spares and the template (on the pool's thread) and makes no more; rooms
    /// already started from the pool stay. `take` finds nothing from then on.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
    }
}

impl Drop for WarmPool {
    fn drop(&mut self) {
        self.close();
    }
}

impl Shared {
    fn fork(&self) -> Option<NewWorker> {
        let mut template = self.template.lock_or_recover();
        let forked = template.as_mut()?.fork();
        match forked {
            Ok(worker) => Some(worker),
            Err(e) => {
                tracing::warn!("the warm pool's template failed ({e}); restarting it");
                if let Some(template) = template.take() {
                    template.stop();
                }
                self.changed.notify_one();
                None
            }
        }
    }

    fn refill(self: Arc<Self>) {
        let mut retry = RETRY_FIRST;
        let mut next_template_at = Instant::now();
        loop {
            if !self.wait_for_work(next_template_at) {
                break;
            }
            // At most one template start per pause: one that dies at once (a broken worker
            // executable) must not double every refill's cost.
            if self.template_missing() && Instant::now() >= next_template_at {
                next_template_at = Instant::now() + RETRY_MAX;
                match Template::start(&self.command, self.limits) {
                    Ok(template) => *self.template.lock_or_recover() = Some(template),
                    Err(e) => tracing::warn!("cannot start the warm pool's template: {e}"),
                }
            }
            if self.spares.lock_or_recover().len() >= self.target {
                continue;
            }
            let made = match self.fork() {
                Some(worker) => Ok(worker),
                None => exec_worker(&self.command, ToWorker::Prepare { limits: self.limits }),
            };
            match made {
                Ok(worker) => {
                    self.spares.lock_or_recover().push_back(worker);
                    retry = RETRY_FIRST;
                }
                Err(e) => {
                    tracing::warn!("cannot start a warm worker: {e}");
                    std::thread::sleep(retry);
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
        // Closed: the spares and the template go; this thread stays, for the rooms started
        // from it (see the module's comment).
        let spares: Vec<NewWorker> = self.spares.lock_or_recover().drain(..).collect();
        for mut spare in spares {
            spare.process.kill_and_reap();
        }
        if let Some(template) = self.template.lock_or_recover().take() {
            template.stop();
        }
        loop {
            std::thread::park();
        }
    }

    /// Whether the engine forks and the pool has no live template. A template that died
    /// (an operator's `kill`) is reaped and dropped here, so the pool restarts it without
    /// waiting for a room to find out.
    fn template_missing(&self) -> bool {
        if !self.limits.engine.forks() {
            return false;
        }
        // Busy means a fork is under way: there is a template.
        let Ok(mut template) = self.template.try_lock() else { return false };
        if template.as_mut().is_some_and(|t| !t.is_running()) {
            tracing::warn!("the warm pool's template exited; restarting it");
            template.take();
        }
        template.is_none()
    }

    /// Waits until there is work (true): the pool is short of a spare, or its template is
    /// missing and due for a restart; false once the pool is closed. Sweeps out dead spares
    /// and notices a dead template while it waits.
    fn wait_for_work(&self, next_template_at: Instant) -> bool {
        let mut spares = self.spares.lock_or_recover();
        let mut swept_at = Instant::now();
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return false;
            }
            if spares.len() < self.target {
                return true;
            }
            let now = Instant::now();
            if now >= next_template_at && self.template_missing() {
                return true;
            }
            // A dead template is noticed at the next sweep, or when its restart falls due.
            let until_restart = next_template_at.saturating_duration_since(now);
            let wait = if until_restart.is_zero() { SWEEP_EVERY } else { until_restart.min(SWEEP_EVERY) };
            let (guard, _) = self.changed.wait_timeout(spares, wait).unwrap_or_else(|e| e.into_inner());
            spares = guard;
            if swept_at.elapsed() >= SWEEP_EVERY {
                spares.retain_mut(|spare| matches!(spare.process.try_wait(), Ok(None)));
                swept_at = Instant::now();
            }
        }
    }
}
