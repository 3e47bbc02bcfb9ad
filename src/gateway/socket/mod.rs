//! One WebSocket connection speaking Phoenix Channels v2.
//!
//! Like Phoenix, each joined topic is a channel with its own task ([`channel`]): it handles
//! its frames one at a time and in order, so a slow room never holds up heartbeats or other
//! channels. The connection task ([`connection`]) reads frames and routes them; a separate
//! writer task drains the outbound queue.

mod channel;
mod connection;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::gateway::auth::{Auth, User};
use crate::gateway::config::Config;
use crate::gateway::phoenix::{write_frames, Outbox, TokenBucket};
use crate::gateway::rooms::{Caller, ClientId, Supervisor};
use crate::gateway::shutdown::Shutdown;
use connection::Connection;

/// How long the writer gets to flush a close frame before the connection is dropped.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// What a connection needs from the gateway.
#[derive(Clone)]
pub struct SocketContext {
    pub supervisor: Supervisor,
    pub config: Arc<Config>,
    pub shutdown: Shutdown,
    /// This socket as a client of the rooms; each connection gets its own (see `serve`).
    pub caller: Caller,
    /// The gateway's key, when sockets must present a token.
    pub auth: Option<Auth>,
    /// Who this socket is, from its token (set at the upgrade); `None` when anonymous.
    pub user: Option<Arc<User>>,
}

/// Serves one upgraded connection until either side closes it.
pub async fn serve(socket: WebSocket, mut ctx: SocketContext) {
    let open = ::metrics::gauge!(crate::gateway::metrics::SOCKETS_OPEN);
    open.increment(1.0);
    // Decremented however this ends, an aborted task included.
    let _open = OpenSocket(open);
    ctx.caller = Caller { id: ClientId::next(), max_started: ctx.config.max_rooms_started_per_socket };
    let (sink, stream) = socket.split();
    let (outbox, outbound) = Outbox::bounded(ctx.config.outbound_queue, ctx.config.outbound_queue_bytes);
    let (close_tx, close_rx) = oneshot::channel();
    let writer = tokio::spawn(write_frames(sink, outbound, close_rx));
    let (ended_tx, ended_rx) = mpsc::channel(16);
    let rate = TokenBucket::new(ctx.config.rate_per_sec, ctx.config.rate_burst);
    let mut connection = Connection::new(ctx, outbox, rate, ended_tx);
    let mut stream = stream;
    let close = connection.run(&mut stream, ended_rx).await;
    let server_closing = close.is_some();
    // Hand the writer its close frame before the outbound queue closes (dropping the
    // connection drops its senders): a writer that saw the queue end first would close
    // without our code.
    let _ = close_tx.send(close);
    drop(connection);
    if server_closing {
        // The closing handshake: read (and drop) what the client still sends until its Close
        // arrives. Dropping the TCP connection with unread input would make the kernel send a
        // reset, and the client would never see our close code.
        let _ = tokio::time::timeout(CLOSE_FLUSH, async {
            while let Some(Ok(message)) = stream.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    let mut writer = writer;
    if tokio::time::timeout(CLOSE_FLUSH, &mut writer).await.is_err() {
        writer.abort();
    }
}

struct OpenSocket(::metrics::Gauge);

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
