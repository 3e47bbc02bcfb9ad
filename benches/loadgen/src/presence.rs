//! The `presence-wave` scenario's pieces: the state its clients share while the wave runs, and
//! each client's presence view, kept the way phoenix.js's `Presence` keeps it.
//!
//! During the wave a client only recognises presence pushes and keeps them as they came;
//! parsing them waits until the room is quiet, so that the load generator, which shares the
//! machine's cores with the gateway, spends as little as it can while the gateway works.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What every client of one wave shares. Times are microseconds since `clock`.
pub struct Wave {
    clock: Instant,
    /// Joins in flight; closed (no permits) until every client is ready to send.
    pub gate: Semaphore,
    stop: CancellationToken,
    first_sent_us: AtomicU64,
    last_reply_us: AtomicU64,
    last_presence_us: AtomicU64,
    answered: AtomicUsize,
}

impl Default for Wave {
    fn default() -> Self {
        Wave {
            clock: Instant::now(),
            gate: Semaphore::new(0),
            stop: CancellationToken::new(),
            first_sent_us: AtomicU64::new(u64::MAX),
            last_reply_us: AtomicU64::new(0),
            last_presence_us: AtomicU64::new(0),
            answered: AtomicUsize::new(0),
        }
    }
}

impl Wave {
    fn now_us(&self) -> u64 {
        self.clock.elapsed().as_micros() as u64
    }

    /// Lets the joins go, `in_flight` at a time.
    pub fn open(&self, in_flight: usize) {
        self.gate.add_permits(in_flight.min(Semaphore::MAX_PERMITS));
    }

    pub fn stopped(&self) -> CancellationToken {
        self.stop.clone()
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn join_sent(&self) {
        self.first_sent_us.fetch_min(self.now_us(), Ordering::Relaxed);
    }

    /// A join was answered (or given up on).
    pub fn answered(&self) {
        self.last_reply_us.fetch_max(self.now_us(), Ordering::Relaxed);
        self.answered.fetch_add(1, Ordering::Relaxed);
    }

    pub fn presence_seen(&self) {
        self.last_presence_us.fetch_max(self.now_us(), Ordering::Relaxed);
    }

    pub fn answered_count(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }

    /// How long since the last presence frame or join reply anywhere: the room is quiet once
    /// this passes the quiet interval (a reply's track is flushed up to 50 ms later).
    pub fn quiet_for(&self) -> Duration {
        let last =
            self.last_presence_us.load(Ordering::Relaxed).max(self.last_reply_us.load(Ordering::Relaxed));
        Duration::from_micros(self.now_us().saturating_sub(last))
    }

    /// First join sent → last join reply.
    pub fn wave_time(&self) -> Duration {
        self.since_first(self.last_reply_us.load(Ordering::Relaxed))
    }

    /// First join sent → last presence frame received.
    pub fn presence_time(&self) -> Duration {
        self.since_first(self.last_presence_us.load(Ordering::Relaxed))
    }

    fn since_first(&self, us: u64) -> Duration {
        let first = self.first_sent_us.load(Ordering::Relaxed);
        Duration::from_micros(us.saturating_sub(first))
    }
}

/// What one client of the wave saw.
pub struct WaveClient {
    /// Join sent → reply; `None` when the client never got to send it.
    pub join: Option<Result<Duration, String>>,
    pub state_frames: u64,
    pub diff_frames: u64,
    /// The frames' text, in bytes (WebSocket framing not counted).
    pub state_bytes: u64,
    pub diff_bytes: u64,
    /// Its presence view once the room was quiet, or why the frames did not apply.
    pub view: Result<View, String>,
}

/// A presence list as phoenix.js's `Presence` keeps it: `presence_state` applied with
/// `syncState`, `presence_diff` with `syncDiff`, metas told apart by `phx_ref`; diffs that
/// arrive before the join's state wait for it, as `Presence`'s pending diffs do.
#[derive(Default)]
pub struct View {
    pub state: BTreeMap<String, Vec<Value>>,
    /// The join_ref of the state applied; `None` until one is.
    join_ref: Option<String>,
    pending: Vec<(Map<String, Value>, Map<String, Value>)>,
}

impl View {
    /// Applies one `presence_state` or `presence_diff` frame, as received.
    pub fn apply(&mut self, frame: &str) -> Result<(), String> {
        let fields: Vec<Value> = serde_json::from_str(frame).map_err(|e| format!("unparsable frame: {e}"))?;
        let event = fields.get(3).and_then(Value::as_str).unwrap_or_default();
        let payload = fields.get(4).and_then(Value::as_object).ok_or("a presence frame without a payload")?;
        match event {
            "presence_state" => {
                self.sync_state(payload)?;
                self.join_ref = Some(fields[0].as_str().unwrap_or_default().to_owned());
                for (joins, leaves) in std::mem::take(&mut self.pending) {
                    self.sync_diff(&joins, &leaves)?;
                }
            }
            "presence_diff" => {
                let part =
                    |name: &str| payload.get(name).and_then(Value::as_object).cloned().unwrap_or_default();
                let (joins, leaves) = (part("joins"), part("leaves"));
                if self.join_ref.is_none() {
                    self.pending.push((joins, leaves));
                } else {
                    self.sync_diff(&joins, &leaves)?;
                }
            }
            other => return Err(format!("not a presence event: {other}")),
        }
        Ok(())
    }

    /// Diffs still waiting for a `presence_state`.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// `Presence.syncState`: the joins and leaves that turn the current state into the new
    /// one, applied as a diff.
    fn sync_state(&mut self, new_state: &Map<String, Value>) -> Result<(), String> {
        let mut joins = Map::new();
        let mut leaves = Map::new();
        for (key, metas) in &self.state {
            if !new_state.contains_key(key) {
                leaves.insert(key.clone(), presence(metas.clone()));
            }
        }
        for (key, new_presence) in new_state {
            let new_metas = metas_of(new_presence)?;
            match self.state.get(key) {
                Some(current) => {
                    let new_refs: Vec<&str> = new_metas.iter().map(phx_ref).collect();
                    let current_refs: Vec<&str> = current.iter().map(phx_ref).collect();
                    let joined: Vec<Value> =
                        new_metas.iter().filter(|m| !current_refs.contains(&phx_ref(m))).cloned().collect();
                    let left: Vec<Value> =
                        current.iter().filter(|m| !new_refs.contains(&phx_ref(m))).cloned().collect();
                    if !joined.is_empty() {
                        joins.insert(key.clone(), presence(joined));
                    }
                    if !left.is_empty() {
                        leaves.insert(key.clone(), presence(left));
                    }
                }
                None => {
                    joins.insert(key.clone(), new_presence.clone());
                }
            }
        }
        self.sync_diff(&joins, &leaves)
    }

    /// `Presence.syncDiff`: a join replaces the key's metas of the same `phx_ref` and keeps the
    /// others before them; a leave removes its refs, and the key once it has no metas left.
    fn sync_diff(&mut self, joins: &Map<String, Value>, leaves: &Map<String, Value>) -> Result<(), String> {
        for (key, new_presence) in joins {
            let mut metas = metas_of(new_presence)?;
            if let Some(current) = self.state.remove(key) {
                let joined: Vec<&str> = metas.iter().map(phx_ref).collect();
                let mut kept: Vec<Value> =
                    current.into_iter().filter(|m| !joined.contains(&phx_ref(m))).collect();
                kept.append(&mut metas);
                metas = kept;
            }
            self.state.insert(key.clone(), metas);
        }
        for (key, left) in leaves {
            let Some(current) = self.state.get_mut(key) else { continue };
            let gone = metas_of(left)?;
            let gone: Vec<&str> = gone.iter().map(phx_ref).collect();
            current.retain(|m| !gone.contains(&phx_ref(m)));
            if current.is_empty() {
                self.state.remove(key);
            }
        }
        Ok(())
    }
}

fn presence(metas: Vec<Value>) -> Value {
    serde_json::json!({ "metas": metas })
}

fn metas_of(presence: &Value) -> Result<Vec<Value>, String> {
    presence["metas"].as_array().cloned().ok_or_else(|| format!("a presence without metas: {presence}"))
}

fn phx_ref(meta: &Value) -> &str {
    meta["phx_ref"].as_str().unwrap_or_default()
}

/// Frames an unbatched Presence would send for `n` joins: each joiner's `presence_state`, and
/// each join's diff to every member already there.
pub fn unbatched_frames(n: usize) -> f64 {
    let n = n as f64;
    n * (n - 1.0) / 2.0 + n
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn frame(join_ref: Value, event: &str, payload: Value) -> String {
        json!([join_ref, null, "room:a", event, payload]).to_string()
    }

    fn one(name: &str, phx_ref: &str) -> Value {
        json!({"metas": [{"name": name, "phx_ref": phx_ref}]})
    }

    fn refs(view: &View, key: &str) -> Vec<String> {
        view.state[key].iter().map(|m| phx_ref(m).to_owned()).collect()
    }

    #[test]
    fn state_then_diffs_make_the_list() {
        let mut view = View::default();
        view.apply(&frame(json!("1"), "presence_state", json!({"u0": one("u0", "1")}))).unwrap();
        // The joiner's own join comes again in the next diff: the same ref, still one meta.
        let diff = json!({"joins": {"u0": one("u0", "1"), "u1": one("u1", "2")}, "leaves": {}});
        view.apply(&frame(Value::Null, "presence_diff", diff)).unwrap();
        assert_eq!(view.state.keys().collect::<Vec<_>>(), ["u0", "u1"]);
        assert_eq!(refs(&view, "u0"), ["1"]);

        // A second tab under the same key adds a meta; its leave takes only that one.
        let diff = json!({"joins": {"u1": one("u1", "3")}, "leaves": {}});
        view.apply(&frame(Value::Null, "presence_diff", diff)).unwrap();
        assert_eq!(refs(&view, "u1"), ["2", "3"]);
        let diff = json!({"joins": {}, "leaves": {"u1": one("u1", "2")}});
        view.apply(&frame(Value::Null, "presence_diff", diff)).unwrap();
        assert_eq!(refs(&view, "u1"), ["3"]);
        let diff = json!({"joins": {}, "leaves": {"u1": one("u1", "3"), "nobody": one("x", "9")}});
        view.apply(&frame(Value::Null, "presence_diff", diff)).unwrap();
        assert_eq!(view.state.keys().collect::<Vec<_>>(), ["u0"]);
    }

    #[test]
    fn diffs_before_the_state_wait_for_it() {
        let mut view = View::default();
        let diff = json!({"joins": {"u2": one("u2", "3")}, "leaves": {"u0": one("u0", "1")}});
        view.apply(&frame(Value::Null, "presence_diff", diff)).unwrap();
        assert!(view.state.is_empty());
        assert_eq!(view.pending(), 1);
        let state = json!({"u0": one("u0", "1"), "u1": one("u1", "2")});
        view.apply(&frame(json!("1"), "presence_state", state)).unwrap();
        assert_eq!(view.pending(), 0);
        assert_eq!(view.state.keys().collect::<Vec<_>>(), ["u1", "u2"]);
    }

    #[test]
    fn a_new_state_replaces_what_it_no_longer_lists() {
        let mut view = View::default();
        let state = json!({"u0": one("u0", "1"), "u1": one("u1", "2")});
        view.apply(&frame(json!("1"), "presence_state", state)).unwrap();
        let state =
            json!({"u1": {"metas": [{"name": "u1", "phx_ref": "2"}, {"name": "u1", "phx_ref": "5"}]}});
        view.apply(&frame(json!("4"), "presence_state", state)).unwrap();
        assert_eq!(view.state.keys().collect::<Vec<_>>(), ["u1"]);
        assert_eq!(refs(&view, "u1"), ["2", "5"]);
    }

    #[test]
    fn bad_frames_are_reported() {
        let mut view = View::default();
        assert!(view.apply("not json").is_err());
        assert!(view.apply(&frame(json!("1"), "presence_state", json!({"u0": {}}))).is_err());
        assert!(view.apply(&frame(json!("1"), "new_message", json!({}))).is_err());
    }

    #[test]
    fn the_unbatched_estimate() {
        assert_eq!(unbatched_frames(1), 1.0);
        assert_eq!(unbatched_frames(3), 6.0);
        assert_eq!(unbatched_frames(1000), 500_500.0);
    }
}
