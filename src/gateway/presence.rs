//! Presence (design §9), in Phoenix Presence's shapes so that phoenix.js's `Presence` class
//! works unchanged: a room's script tracks its joins under keys with metadata, a new join
//! gets `presence_state` `{key: {metas: [{phx_ref, ...meta}]}}`, and the room gets
//! `presence_diff` `{joins, leaves}` in the same shape.
//!
//! This is the bookkeeping alone, without I/O: the PubSub owns one, checks membership and
//! sends the frames. Presence lives in the gateway, so a worker crash does not lose it; the
//! replay of a room's joins refreshes it, and what the new runtime does not track again
//! leaves. Diffs are batched: whatever changed within one flush interval goes out as one
//! frame, so a wave of joins costs each member one frame per interval, not one per join.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Map, Value};

type Meta = Map<String, Value>;

#[derive(Default)]
pub struct PresenceState {
    topics: HashMap<String, Tracked>,
}

#[derive(Default)]
struct Tracked {
    /// By conn id: one entry per join.
    entries: HashMap<Arc<str>, Entry>,
    pending: Diff,
    /// A flush is scheduled; changes until then join the pending diff.
    flush_scheduled: bool,
    /// While a new runtime replays the joins: the conns it has not tracked again yet.
    stale: Option<HashSet<Arc<str>>>,
}

#[derive(Clone, PartialEq)]
struct Entry {
    key: String,
    /// The script's meta; `phx_ref` is added when it is listed.
    meta: Meta,
    phx_ref: String,
}

impl Entry {
    fn listed_meta(&self) -> Value {
        let mut meta = self.meta.clone();
        meta.insert("phx_ref".to_owned(), Value::String(self.phx_ref.clone()));
        Value::Object(meta)
    }
}

/// Changes not sent yet, by `phx_ref`, so that a join and its leave within one interval
/// cancel out.
#[derive(Default)]
struct Diff {
    joins: BTreeMap<String, Entry>,
    leaves: BTreeMap<String, Entry>,
}

impl Diff {
    fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }

    fn join(&mut self, entry: Entry) {
        self.joins.insert(entry.phx_ref.clone(), entry);
    }

    fn leave(&mut self, entry: Entry) {
        if self.joins.remove(&entry.phx_ref).is_none() {
            self.leaves.insert(entry.phx_ref.clone(), entry);
        }
    }
}

/// What a change asks of the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Changed {
    No,
    /// A diff is now pending and no flush is scheduled: schedule one.
    ScheduleFlush,
    /// A diff is pending and a flush is already on its way.
    Pending,
}

impl PresenceState {
    /// Tracks (or updates) a join under `key`. Tracking the same key and meta again changes
    /// nothing, and neither does a replayed join tracked under its old key.
    pub fn track(
        &mut self,
        topic: &str,
        conn: Arc<str>,
        key: String,
        meta: Meta,
        phx_ref: String,
    ) -> Changed {
        let tracked = self.topics.entry(topic.to_owned()).or_default();
        let replayed = tracked.stale.as_mut().is_some_and(|stale| stale.remove(&conn));
        if let Some(old) = tracked.entries.get(&conn) {
            // A replayed join tracked under its key again keeps the entry it had: the new
            // runtime cannot know the old meta (the chat's online_at), and a crash should not
            // look to everyone like a room-wide leave and rejoin.
            if old.key == key && (replayed || old.meta == meta) {
                return Changed::No;
            }
        }
        let entry = Entry { key, meta, phx_ref };
        if let Some(old) = tracked.entries.insert(conn, entry.clone()) {
            tracked.pending.leave(old);
        }
        tracked.pending.join(entry);
        tracked.changed()
    }

    /// Stops tracking a join; nothing if it was not tracked.
    pub fn untrack(&mut self, topic: &str, conn: &str) -> Changed {
        let Some(tracked) = self.topics.get_mut(topic) else { return Changed::No };
        let Some(old) = tracked.entries.remove(conn) else { return Changed::No };
        tracked.pending.leave(old);
        tracked.changed()
    }

    /// The topic's presence list, `{key: {metas: [...]}}`, metas in the order they were tracked.
    pub fn list(&self, topic: &str) -> Value {
        let mut by_key: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
        if let Some(tracked) = self.topics.get(topic) {
            for entry in tracked.entries.values() {
                by_key.entry(&entry.key).or_default().push(entry);
            }
        }
        let mut list = Map::new();
        for (key, mut entries) in by_key {
            entries.sort_by(|a, b| natural(&a.phx_ref).cmp(&natural(&b.phx_ref)));
            let metas: Vec<Value> = entries.iter().map(|e| e.listed_meta()).collect();
            list.insert(key.to_owned(), serde_json::json!({ "metas": metas }));
        }
        Value::Object(list)
    }

    /// Takes the pending diff as `presence_diff`'s payload, if anything changed; the next
    /// change schedules a new flush.
    pub fn take_diff(&mut self, topic: &str) -> Option<Value> {
        let tracked = self.topics.get_mut(topic)?;
        tracked.flush_scheduled = false;
        let diff = std::mem::take(&mut tracked.pending);
        if tracked.entries.is_empty() && tracked.stale.is_none() {
            self.topics.remove(topic);
        }
        if diff.is_empty() {
            return None;
        }
        Some(serde_json::json!({ "joins": grouped(diff.joins), "leaves": grouped(diff.leaves) }))
    }

    /// A new runtime is about to replay these joins: their entries stay until
    /// [`PresenceState::end_replay`], unless tracked again meanwhile.
    pub fn begin_replay(&mut self, topic: &str, conns: impl IntoIterator<Item = Arc<str>>) {
        let tracked = self.topics.entry(topic.to_owned()).or_default();
        let stale: HashSet<Arc<str>> =
            conns.into_iter().filter(|c| tracked.entries.contains_key(c)).collect();
        tracked.stale = Some(stale);
    }

    /// The replay is over: the entries the new runtime did not track again leave.
    pub fn end_replay(&mut self, topic: &str) -> Changed {
        let Some(tracked) = self.topics.get_mut(topic) else { return Changed::No };
        let stale = tracked.stale.take().unwrap_or_default();
        let mut changed = Changed::No;
        for conn in stale {
            if let Some(old) = tracked.entries.remove(&conn) {
                tracked.pending.leave(old);
                changed = tracked.changed();
            }
        }
        changed
    }

    /// The topic's entries whose conn passes `filter`: `(conn, key, meta, phx_ref)`.
    pub fn entries_where(
        &self,
        topic: &str,
        filter: impl Fn(&str) -> bool,
    ) -> Vec<(Arc<str>, String, Meta, String)> {
        let Some(tracked) = self.topics.get(topic) else { return Vec::new() };
        let entries = tracked.entries.iter().filter(|(conn, _)| filter(conn));
        entries.map(|(conn, e)| (conn.clone(), e.key.clone(), e.meta.clone(), e.phx_ref.clone())).collect()
    }

    /// Drops every entry (of one topic, or all) whose conn passes `filter`: another node's,
    /// when this node stops hearing about the topic or about that node. Returns the topics
    /// that changed.
    pub fn remove_where(
        &mut self,
        only: Option<&str>,
        filter: impl Fn(&str) -> bool,
    ) -> Vec<(String, Changed)> {
        let mut changed = Vec::new();
        for (topic, tracked) in &mut self.topics {
            if only.is_some_and(|only| only != topic) {
                continue;
            }
            let gone: Vec<Arc<str>> = tracked.entries.keys().filter(|conn| filter(conn)).cloned().collect();
            if gone.is_empty() {
                continue;
            }
            for conn in gone {
                if let Some(old) = tracked.entries.remove(&conn) {
                    tracked.pending.leave(old);
                }
            }
            changed.push((topic.clone(), tracked.changed()));
        }
        changed
    }

    /// How many joins the topic tracks.
    #[cfg(test)]
    fn entries(&self, topic: &str) -> usize {
        self.topics.get(topic).map_or(0, |t| t.entries.len())
    }
}

impl Tracked {
    fn changed(&mut self) -> Changed {
        if self.pending.is_empty() {
            return Changed::No;
        }
        if self.flush_scheduled {
            return Changed::Pending;
        }
        self.flush_scheduled = true;
        Changed::ScheduleFlush
    }
}

fn grouped(entries: BTreeMap<String, Entry>) -> Value {
    let mut by_key: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut ordered: Vec<Entry> = entries.into_values().collect();
    ordered.sort_by(|a, b| natural(&a.phx_ref).cmp(&natural(&b.phx_ref)));
    for entry in ordered {
        by_key.entry(entry.key.clone()).or_default().push(entry.listed_meta());
    }
    let map: Map<String, Value> =
        by_key.into_iter().map(|(key, metas)| (key, serde_json::json!({ "metas": metas }))).collect();
    Value::Object(map)
}

/// Refs end in a counter (`<node>.<n>` or `<n>`): ordered by it, they are in tracking order.
fn natural(phx_ref: &str) -> (u64, &str) {
    let n = phx_ref.rsplit('.').next().and_then(|n| n.parse().ok()).unwrap_or(u64::MAX);
    (n, phx_ref)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(name: &str) -> Meta {
        json!({ "name": name }).as_object().cloned().unwrap()
    }

    #[test]
    fn tracks_list_in_phoenix_shape_and_diffs_batch() {
        let mut p = PresenceState::default();
        assert_eq!(p.track("t", "c1".into(), "ann".into(), meta("Ann"), "1".into()), Changed::ScheduleFlush);
        assert_eq!(p.track("t", "c2".into(), "ann".into(), meta("Ann"), "2".into()), Changed::Pending);
        assert_eq!(p.track("t", "c3".into(), "bob".into(), meta("Bob"), "3".into()), Changed::Pending);
        assert_eq!(
            p.list("t"),
            json!({
                "ann": {"metas": [{"name": "Ann", "phx_ref": "1"}, {"name": "Ann", "phx_ref": "2"}]},
                "bob": {"metas": [{"name": "Bob", "phx_ref": "3"}]},
            })
        );
        // Bob comes and goes within one interval: the diff never mentions him.
        assert_eq!(p.untrack("t", "c3"), Changed::Pending);
        let diff = p.take_diff("t").unwrap();
        assert_eq!(diff["leaves"], json!({}));
        assert_eq!(diff["joins"]["ann"]["metas"].as_array().map(Vec::len), Some(2));
        assert!(diff["joins"].get("bob").is_none(), "{diff}");
        assert_eq!(p.take_diff("t"), None);

        assert_eq!(p.untrack("t", "c2"), Changed::ScheduleFlush, "a new change schedules anew");
        let diff = p.take_diff("t").unwrap();
        assert_eq!(
            diff,
            json!({"joins": {}, "leaves": {"ann": {"metas": [{"name": "Ann", "phx_ref": "2"}]}}})
        );
        assert_eq!(p.untrack("t", "nobody"), Changed::No);
    }

    #[test]
    fn an_update_leaves_the_old_meta_and_joins_the_new() {
        let mut p = PresenceState::default();
        p.track("t", "c1".into(), "ann".into(), meta("Ann"), "1".into());
        p.take_diff("t");
        assert_eq!(
            p.track("t", "c1".into(), "ann".into(), meta("Ann"), "2".into()),
            Changed::No,
            "same meta"
        );
        p.track("t", "c1".into(), "ann".into(), meta("Annie"), "3".into());
        let diff = p.take_diff("t").unwrap();
        assert_eq!(diff["leaves"]["ann"]["metas"][0]["name"], "Ann");
        assert_eq!(diff["joins"]["ann"]["metas"][0], json!({"name": "Annie", "phx_ref": "3"}));
    }

    #[test]
    fn a_replay_keeps_what_is_tracked_again_and_drops_the_rest() {
        let mut p = PresenceState::default();
        p.track("t", "c1".into(), "ann".into(), meta("Ann"), "1".into());
        p.track("t", "c2".into(), "bob".into(), meta("Bob"), "2".into());
        p.take_diff("t");
        p.begin_replay("t", ["c1".into(), "c2".into()]);
        let later = json!({ "name": "Ann", "online_at": 2 }).as_object().cloned().unwrap();
        assert_eq!(p.track("t", "c1".into(), "ann".into(), later, "9".into()), Changed::No, "same key: kept");
        p.end_replay("t");
        assert_eq!(p.entries("t"), 1);
        let diff = p.take_diff("t").unwrap();
        assert_eq!(
            diff,
            json!({"joins": {}, "leaves": {"bob": {"metas": [{"name": "Bob", "phx_ref": "2"}]}}})
        );
        assert_eq!(p.list("t")["ann"]["metas"][0]["phx_ref"], "1", "Ann kept her entry");
    }
}
