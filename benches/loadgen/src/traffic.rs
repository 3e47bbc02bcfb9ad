//! The state every client of a traffic scenario shares: what senders should do now, the
//! counters, and the send-to-receive latencies of the phase being measured.
//!
//! "As fast as replies allow" alone would let a fan-out sender run far ahead of its 1,000
//! receivers (a reply only says the message was queued), and the servers' outbound queues
//! would grow until the slowest readers were cut off. So a fan-out run also caps the
//! deliveries still owed: the sender waits while more than `backlog_messages` messages'
//! worth of deliveries are outstanding. The rate it settles at is the rate the server can
//! actually deliver.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::protocol::Stamp;
use crate::stats::Latencies;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Nobody sends.
    Quiet,
    /// Each sender keeps up to `window` pushes unanswered.
    Max { window: usize },
    /// Each sender sends once per interval, whatever the replies do.
    Paced { interval: Duration },
}

/// Counters, read as differences between two snapshots.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub pushes: u64,
    pub deliveries: u64,
    pub ok_replies: u64,
    pub error_replies: u64,
}

impl Counts {
    /// Deliveries not yet seen of the messages the server accepted (a refused push is
    /// delivered to nobody).
    pub fn owed(&self, receivers_per_message: u64) -> u64 {
        let accepted = self.pushes.saturating_sub(self.error_replies);
        (accepted * receivers_per_message).saturating_sub(self.deliveries)
    }
}

/// Caps the deliveries owed to receivers (see the module comment).
struct Backlog {
    receivers_per_message: u64,
    limit_messages: u64,
    delivered: Notify,
}

pub struct Traffic {
    clock: Instant,
    mode: watch::Sender<Mode>,
    stop: CancellationToken,
    pushes: AtomicU64,
    deliveries: AtomicU64,
    ok_replies: AtomicU64,
    error_replies: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    backlog: Option<Backlog>,
    /// Latencies are kept for messages sent at or after this time (µs on `clock`), so a
    /// phase never counts what the previous one left queued.
    measure_from_us: AtomicU64,
    phase: AtomicUsize,
    latencies: Vec<Mutex<Latencies>>,
}

impl Traffic {
    /// `phases` latency distributions are kept; `backlog` is (receivers per message, messages).
    pub fn new(phases: usize, backlog: Option<(u64, u64)>) -> Traffic {
        Traffic {
            clock: Instant::now(),
            mode: watch::channel(Mode::Quiet).0,
            stop: CancellationToken::new(),
            pushes: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            ok_replies: AtomicU64::new(0),
            error_replies: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            backlog: backlog.map(|(receivers_per_message, limit_messages)| Backlog {
                receivers_per_message,
                limit_messages,
                delivered: Notify::new(),
            }),
            measure_from_us: AtomicU64::new(u64::MAX),
            phase: AtomicUsize::new(0),
            latencies: (0..phases).map(|_| Mutex::new(Latencies::default())).collect(),
        }
    }

    pub fn now_us(&self) -> u64 {
        self.clock.elapsed().as_micros() as u64
    }

    pub fn mode(&self) -> watch::Receiver<Mode> {
        self.mode.subscribe()
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// From now on, latencies of newly sent messages go to `phase`.
    pub fn measure(&self, phase: usize) {
        self.phase.store(phase, Ordering::SeqCst);
        self.measure_from_us.store(self.now_us(), Ordering::SeqCst);
    }

    pub fn stopped(&self) -> CancellationToken {
        self.stop.clone()
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn counts(&self) -> Counts {
        Counts {
            pushes: self.pushes.load(Ordering::Relaxed),
            deliveries: self.deliveries.load(Ordering::Relaxed),
            ok_replies: self.ok_replies.load(Ordering::Relaxed),
            error_replies: self.error_replies.load(Ordering::Relaxed),
        }
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        lock(&self.errors).clone()
    }

    pub fn latencies(&self, phase: usize) -> Latencies {
        self.latencies.get(phase).map(|l| lock(l).clone()).unwrap_or_default()
    }

    /// A position in [0, 1) for a client, so paced senders start spread out.
    pub fn jitter(&self, client: u64) -> f64 {
        (client.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Resolves when a sender in `mode` may send its next push.
    pub async fn turn(&self, mode: Mode, in_flight: usize, next_send_at: Instant) {
        match mode {
            Mode::Quiet => std::future::pending().await,
            Mode::Max { window } if in_flight >= window => std::future::pending().await,
            Mode::Max { .. } => self.backlog_below_limit().await,
            Mode::Paced { .. } => tokio::time::sleep_until(next_send_at).await,
        }
    }

    async fn backlog_below_limit(&self) {
        let Some(backlog) = &self.backlog else { return };
        loop {
            let delivered = backlog.delivered.notified();
            let outstanding = self.counts().owed(backlog.receivers_per_message);
            if outstanding <= backlog.limit_messages * backlog.receivers_per_message {
                return;
            }
            delivered.await;
        }
    }

    pub fn sent(&self) {
        self.pushes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn delivered(&self, receiver: u64, stamp: Option<Stamp>) {
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        if let Some(backlog) = &self.backlog {
            backlog.delivered.notify_one();
        }
        let Some(stamp) = stamp else { return };
        // Send-to-receive is measured at the other subscribers, not at the sender's echo.
        if stamp.client == receiver || stamp.sent_us < self.measure_from_us.load(Ordering::Relaxed) {
            return;
        }
        let latency = self.now_us().saturating_sub(stamp.sent_us);
        if let Some(latencies) = self.latencies.get(self.phase.load(Ordering::Relaxed)) {
            lock(latencies).record_us(latency);
        }
    }

    pub fn replied(&self, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => self.ok_replies.fetch_add(1, Ordering::Relaxed),
            Err(reason) => {
                self.error(&reason);
                self.error_replies.fetch_add(1, Ordering::Relaxed)
            }
        };
    }

    pub fn error(&self, what: &str) {
        *lock(&self.errors).entry(what.to_owned()).or_default() += 1;
    }

    /// Waits until every delivery owed has arrived, or `limit` passes.
    pub async fn drain(&self, receivers_per_message: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.counts().owed(receivers_per_message) == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
