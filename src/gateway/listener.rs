//! The accept loop: what a connection may hold before it has said anything useful.
//!
//! The descriptors the process may open, less a reserve and the room workers' pipes, are
//! shared out so that room starts and the log never run short:
//!
//! - A new connection first waits for its request head, with a deadline. At most a third of
//!   the budget may wait so; past that, the one waiting longest is dropped to make room. A
//!   real client sends its head in a moment, so slow-header clients only ever evict each
//!   other, and `/healthz` and new sockets still get through.
//! - A connection whose head has arrived takes one of the other two thirds, the connection
//!   slots, for as long as it lives; with none free its request is answered 503 and the
//!   connection closed.
//!
//! Each request carries its peer's address (`ConnectInfo`), for per-address limits and the
//! operator API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::gateway::shutdown::Shutdown;
use crate::util::LockExt;

/// Descriptors kept out of the connection slots: the listener, logs, pipes of workers being
/// spawned, NATS, and slack.
const RESERVED_FDS: u64 = 64;
/// A failed accept (out of descriptors, most likely) is retried after this pause rather than
/// in a hot loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How many connections may be served, and how many more may wait for their request head.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_pending_heads: usize,
    pub head_timeout: Duration,
}

impl ConnectionLimits {
    /// `wanted` connections if the operator named a number; otherwise two thirds of what the
    /// descriptor limit holds once the reserve and the room workers' channels (one per room,
    /// up to half of what is left) are set aside. Half as many again may wait for a head.
    pub fn new(
        wanted: Option<usize>,
        open_files: u64,
        max_rooms: usize,
        head_timeout: Duration,
    ) -> ConnectionLimits {
        let usable = open_files.saturating_sub(RESERVED_FDS);
        let for_rooms = (max_rooms as u64).min(usable / 2);
        let budget = usize::try_from(usable - for_rooms).unwrap_or(usize::MAX);
        let fitting = budget - budget / 3;
        let max_connections = wanted.unwrap_or(fitting).max(2);
        if max_connections > fitting {
            tracing::warn!(
                "--max-connections {max_connections} is more than {fitting}, what {open_files} open files \
                 hold beside the room workers: past it, starting rooms may fail"
            );
        }
        ConnectionLimits { max_connections, max_pending_heads: (max_connections / 2).max(1), head_timeout }
    }
}

/// Connections still sending their request head, oldest first.
struct PendingHeads {
    max: usize,
    next_id: u64,
    waiting: BTreeMap<u64, CancellationToken>,
}

impl PendingHeads {
    /// Registers a new connection, dropping the one waiting longest if the table is full.
    fn admit(&mut self) -> (u64, CancellationToken) {
        if self.waiting.len() >= self.max {
            if let Some((_, oldest)) = self.waiting.pop_first() {
                oldest.cancel();
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let dropped = CancellationToken::new();
        self.waiting.insert(id, dropped.clone());
        (id, dropped)
    }
}

/// A connection's place in [`PendingHeads`], given up when its first head arrives or it ends.
struct HeadPending {
    table: Arc<Mutex<PendingHeads>>,
    id: u64,
}

impl Drop for HeadPending {
    fn drop(&mut self) {
        self.table.lock_or_recover().waiting.remove(&self.id);
    }
}

/// Serves `router` on `listener` until `shutdown`; connections are tracked in `connections`
/// so the caller can wait for them.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: Shutdown,
    connections: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let pending = Arc::new(Mutex::new(PendingHeads {
        max: limits.max_pending_heads,
        next_id: 0,
        waiting: BTreeMap::new(),
    }));
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.wait() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let (id, dropped) = pending.lock_or_recover().admit();
        let head = HeadPending { table: pending.clone(), id };
        let connection = Connection { tcp, peer, head, dropped, slots: slots.clone() };
        connections.spawn(serve_connection(
            connection,
            router.clone(),
            limits.head_timeout,
            shutdown.clone(),
        ));
    }
}

/// An accepted connection and what it holds.
struct Connection {
    tcp: TcpStream,
    peer: SocketAddr,
    head: HeadPending,
    /// Cancelled when newer connections need its place while it still has sent no head.
    dropped: CancellationToken,
    slots: Arc<Semaphore>,
}

/// A connection slot, shared by the HTTP connection and, after an upgrade, the WebSocket that
/// outlives it: the slot is free again once both are gone.
#[derive(Clone)]
pub struct ConnectionSlot {
    _permit: Arc<OwnedSemaphorePermit>,
}

/// What a connection holds once it has shown it is a client.
struct Admission {
    head: Option<HeadPending>,
    slot: Option<ConnectionSlot>,
}

impl Admission {
    /// Trades the place in the waiting table for a connection slot; `None` when none is free.
    fn admit(&mut self, slots: &Arc<Semaphore>) -> Option<ConnectionSlot> {
        self.head.take();
        if self.slot.is_none() {
            self.slot = slots
                .clone()
                .try_acquire_owned()
                .ok()
                .map(|permit| ConnectionSlot { _permit: Arc::new(permit) });
        }
        self.slot.clone()
    }
}

fn at_capacity() -> axum::response::Response {
    use axum::response::IntoResponse;
    let close = [(axum::http::header::CONNECTION, "close")];
    (axum::http::StatusCode::SERVICE_UNAVAILABLE, close, "at the connection limit; try again later")
        .into_response()
}

async fn serve_connection(
    connection: Connection,
    router: Router,
    head_timeout: Duration,
    shutdown: Shutdown,
) {
    let Connection { tcp, peer, head, dropped, slots } = connection;
    // Chat frames are small and latency-bound: without TCP_NODELAY, Nagle's algorithm meets
    // the client's delayed ACK and a reply can wait ~40 ms.
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!("cannot set TCP_NODELAY: {e}");
    }
    let admission = Arc::new(Mutex::new(Admission { head: Some(head), slot: None }));
    let waiting = admission.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        let admitted = admission.lock_or_recover().admit(&slots);
        let router = router.clone();
        async move {
            let Some(slot) = admitted else {
                tracing::warn!(peer = %peer, "at the connection limit; refusing a request");
                return Ok(at_capacity());
            };
            request.extensions_mut().insert(ConnectInfo(peer));
            // An upgraded socket keeps the slot (see the WebSocket route).
            request.extensions_mut().insert(slot);
            router.oneshot(request).await
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(head_timeout);
    let served = builder.serve_connection(TokioIo::new(tcp), service).with_upgrades();
    tokio::pin!(served);
    tokio::select! {
        outcome = served.as_mut() => {
            if let Err(e) = outcome {
                tracing::debug!(peer = %peer, "connection ended: {e}");
            }
        }
        // Only a connection that never finished a head is ever asked to make room.
        () = dropped.cancelled(), if waiting.lock_or_recover().head.is_some() => {
            tracing::debug!(peer = %peer, "dropped a connection still sending its request head");
        }
        () = shutdown.wait() => {
            // Requests in progress finish; an idle keep-alive connection closes now.
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_get_the_descriptors_the_rooms_do_not_need() {
        let second = Duration::from_secs(1);
        let tight = ConnectionLimits::new(None, 256, 1024, second);
        assert_eq!((tight.max_connections, tight.max_pending_heads), (64, 32), "rooms take half at most");
        let usual = ConnectionLimits::new(None, 20_000, 1024, second);
        let budget = 20_000 - 64 - 1024;
        assert_eq!(usual.max_connections, budget - budget / 3, "one descriptor per room set aside");
        let named = ConnectionLimits::new(Some(15_000), 20_000, 100_000, second);
        assert_eq!(named.max_connections, 15_000, "the operator's number stands");
        assert!(ConnectionLimits::new(None, 10, 1024, second).max_connections >= 2);
    }
}
