//! Room ownership: one node per room, claimed in a JetStream key-value bucket.
//!
//! A claim is an atomic `create` of the room's key; its value names the owner node and the
//! runtime it started. The bucket's max age is the lease: an owner renews each claim well within it,
//! and a node that dies stops renewing, so its keys expire and the next use of its rooms
//! claims them elsewhere.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind};
use bytes::Bytes;

use crate::gateway::rooms::{Claim, Holder, NodeId, PlacementError, RoomId, RuntimeId};
use crate::util::{LockExt, RwLockExt};

const BUCKET: &str = "roomvisor-rooms";
/// Lease renewals in flight at once.
const RENEWALS_AT_ONCE: usize = 64;
/// Key-value calls give up after this long, so a lost connection means a clear error, not a hang.
const KV_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub(crate) enum LeaseError {
    /// The bucket is not open yet: NATS is unreachable or JetStream is not enabled.
    NotReady,
    /// The room's lease changed hands between two steps of a claim.
    Moved,
    /// NATS failed; carries its error.
    Nats(Box<dyn std::error::Error + Send + Sync>),
}

impl LeaseError {
    fn nats(error: impl std::error::Error + Send + Sync + 'static) -> LeaseError {
        LeaseError::Nats(Box::new(error))
    }
}

impl std::fmt::Display for LeaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseError::NotReady => f.write_str("not connected to the cluster"),
            LeaseError::Moved => f.write_str("the room's lease changed hands; try again"),
            LeaseError::Nats(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for LeaseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LeaseError::Nats(e) => Some(&**e),
            _ => None,
        }
    }
}

impl From<LeaseError> for PlacementError {
    fn from(error: LeaseError) -> Self {
        match error {
            LeaseError::NotReady => PlacementError::NotReady,
            other => PlacementError::Failed(std::sync::Arc::new(other)),
        }
    }
}

/// A lease's value: the holder as `node/runtime`, so a restarted room is told apart from the
/// one it replaced.
fn encode_holder(holder: &Holder) -> Bytes {
    Bytes::from(format!("{}/{}", holder.node, holder.runtime))
}

/// Reads a lease's value. A value this version did not write still names a node (runtime 0),
/// so it is never taken for one of ours.
fn decode_holder(value: &[u8]) -> Holder {
    let value = String::from_utf8_lossy(value);
    match value.rsplit_once('/').and_then(|(node, runtime)| Some((node, runtime.parse().ok()?))) {
        Some((node, runtime)) => Holder { node: NodeId::new(node), runtime: RuntimeId::new(runtime) },
        None => Holder { node: NodeId::new(&value), runtime: RuntimeId::new(0) },
    }
}

/// One renewal: the new revision, `None` if another node holds the room now.
async fn renew_one(
    store: &kv::Store,
    room: &RoomId,
    holder: &Holder,
    revision: u64,
) -> Result<Option<u64>, LeaseError> {
    let value = encode_holder(holder);
    match store.update(room.key().as_str(), value.clone(), revision).await {
        Ok(revision) => Ok(Some(revision)),
        // Expired (an outage longer than the lease, or a restarted server): claim it again
        // if nobody else has.
        Err(_) => match store.create(room.key().as_str(), value).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(LeaseError::nats(e)),
        },
    }
}

pub(crate) struct Leases {
    lease: Duration,
    store: RwLock<Option<kv::Store>>,
    /// Rooms this node holds: their holder value and the revision the last renewal wrote.
    held: Mutex<HashMap<RoomId, (Holder, u64)>>,
}

impl Leases {
    pub fn new(lease: Duration) -> Leases {
        Leases { lease, store: RwLock::new(None), held: Mutex::new(HashMap::new()) }
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    pub fn is_ready(&self) -> bool {
        self.store.read_or_recover().is_some()
    }

    /// Opens (creating if needed) the bucket. In memory: leases are meant to die with the
    /// server, and a restarted server gets them back from the owners' next renewal.
    pub async fn open(&self, client: &async_nats::Client) -> Result<(), LeaseError> {
        let mut jetstream = async_nats::jetstream::new(client.clone());
        jetstream.set_timeout(KV_TIMEOUT);
        let config = kv::Config {
            bucket: BUCKET.to_owned(),
            history: 1,
            max_age: self.lease,
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        };
        let store = match jetstream.create_key_value(config).await {
            Ok(store) => store,
            // Another node created it first, with the same settings.
            Err(create) => jetstream
                .get_key_value(BUCKET)
                .await
                .map_err(|get| LeaseError::Nats(format!("{create}; {get}").into()))?,
        };
        *self.store.write_or_recover() = Some(store);
        Ok(())
    }

    /// Forgets the bucket, so the next renewal opens it again (after a server restart).
    pub fn close(&self) {
        *self.store.write_or_recover() = None;
    }

    fn store(&self) -> Result<kv::Store, LeaseError> {
        self.store.read_or_recover().clone().ok_or(LeaseError::NotReady)
    }

    /// The room's holder, if its lease is alive.
    pub async fn holder(&self, room: &RoomId) -> Result<Option<Holder>, LeaseError> {
        let value = self.store()?.get(room.key().as_str()).await.map_err(LeaseError::nats)?;
        Ok(value.map(|v| decode_holder(&v)))
    }

    /// Claims the room for `holder` unless a live lease names someone else.
    pub async fn claim(&self, room: &RoomId, holder: Holder) -> Result<Claim, LeaseError> {
        let store = self.store()?;
        match store.create(room.key().as_str(), encode_holder(&holder)).await {
            Ok(revision) => {
                self.held().insert(room.clone(), (holder, revision));
                Ok(Claim::Ours)
            }
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                let entry = store.entry(room.key().as_str()).await.map_err(LeaseError::nats)?;
                let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                    // Expired between the two calls: the next attempt will get it.
                    return Err(LeaseError::Moved);
                };
                let current = decode_holder(&entry.value);
                if current.node != holder.node {
                    return Ok(Claim::Held(current));
                }
                // Our own lease on a runtime that is gone (it ended before its release
                // reached NATS): take it over for the new runtime.
                let value = encode_holder(&holder);
                match store.update(room.key().as_str(), value, entry.revision).await {
                    Ok(revision) => {
                        self.held().insert(room.clone(), (holder, revision));
                        Ok(Claim::Ours)
                    }
                    Err(e) => Err(LeaseError::nats(e)),
                }
            }
            Err(e) => Err(LeaseError::nats(e)),
        }
    }

    /// Gives a room up, if this node still holds it with that holder value.
    pub async fn release(&self, room: &RoomId, holder: &Holder) {
        let revision = {
            let mut held = self.held();
            match held.get(room) {
                Some((h, revision)) if h == holder => {
                    let revision = *revision;
                    held.remove(room);
                    revision
                }
                _ => return,
            }
        };
        if let Ok(store) = self.store() {
            if let Err(e) = store.delete_expect_revision(room.key().as_str(), Some(revision)).await {
                tracing::debug!(room = %room, "releasing the room's lease: {e}");
            }
        }
    }

    /// Renews every lease this node holds, many at a time (one after another, a thousand
    /// renewals on a loaded server outlasted the lease itself); returns the rooms whose lease
    /// another node now holds (their runtimes here must stop).
    pub async fn renew(&self) -> Result<Vec<(RoomId, Holder)>, LeaseError> {
        use futures_util::StreamExt;
        let store = self.store()?;
        let held: Vec<(RoomId, Holder, u64)> = self
            .held()
            .iter()
            .map(|(room, (holder, revision))| (room.clone(), holder.clone(), *revision))
            .collect();
        let outcomes: Vec<_> = futures_util::stream::iter(held)
            .map(|(room, holder, revision)| {
                let store = &store;
                async move {
                    let renewed = renew_one(store, &room, &holder, revision).await;
                    (room, holder, renewed)
                }
            })
            .buffer_unordered(RENEWALS_AT_ONCE)
            .collect()
            .await;
        let mut lost = Vec::new();
        let mut failure = None;
        let mut held = self.held();
        for (room, holder, renewed) in outcomes {
            match renewed {
                Ok(Some(revision)) => {
                    if let Some(entry) = held.get_mut(&room).filter(|(h, _)| *h == holder) {
                        entry.1 = revision;
                    }
                }
                Ok(None) => {
                    if held.get(&room).is_some_and(|(h, _)| *h == holder) {
                        held.remove(&room);
                    }
                    lost.push((room, holder));
                }
                Err(e) => failure = Some(e),
            }
        }
        match failure {
            Some(e) if lost.is_empty() => Err(e),
            _ => Ok(lost),
        }
    }

    /// Every live lease in the bucket: room id and holder.
    pub async fn all(&self) -> Result<Vec<(String, Holder)>, LeaseError> {
        use futures_util::TryStreamExt;
        let store = self.store()?;
        let keys: Vec<String> =
            store.keys().await.map_err(LeaseError::nats)?.try_collect().await.map_err(LeaseError::nats)?;
        let mut leases = Vec::with_capacity(keys.len());
        for key in keys {
            if let Ok(Some(value)) = store.get(key.as_str()).await {
                leases.push((key, decode_holder(&value)));
            }
        }
        Ok(leases)
    }

    fn held(&self) -> MutexGuard<'_, HashMap<RoomId, (Holder, u64)>> {
        self.held.lock_or_recover()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_round_trip_through_the_lease_value() {
        let holder = Holder { node: NodeId::new("gw-1/a"), runtime: RuntimeId::new(42) };
        assert_eq!(encode_holder(&holder), "gw-1/a/42");
        assert_eq!(decode_holder(b"gw-1/a/42"), holder, "node names may hold a slash");
        let foreign = decode_holder(b"someone");
        assert_eq!((foreign.node.as_str(), foreign.runtime.get()), ("someone", 0));
    }
}
