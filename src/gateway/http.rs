//! HTTP routes: the chat, game and admin pages, the Phoenix WebSocket endpoint, and the operator API.

use axum::extract::ws::WebSocketUpgrade;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::task::TaskTracker;

use super::auth::presented_token;
use super::cluster::Cluster;
use super::listener::ConnectionSlot;
use super::origin::OriginPolicy;
use super::quota::SocketsPerAddress;
use super::socket::{self, SocketContext};

const INDEX_HTML: &str = include_str!("../../static/index.html");
const GAME_HTML: &str = include_str!("../../static/game.html");
const ADMIN_HTML: &str = include_str!("../../static/admin.html");

#[derive(Clone)]
pub struct AppState {
    pub socket: SocketContext,
    pub cluster: Option<Cluster>,
    pub origins: OriginPolicy,
    pub sockets_per_address: SocketsPerAddress,
    /// With it, `/api/rooms` also answers requests from other machines that present it.
    pub api_token: Option<String>,
    /// With it, the admin API also answers other machines that present it.
    pub admin_token: Option<String>,
    /// Upgraded connections outlive their HTTP request; shutdown waits for them here.
    pub connections: TaskTracker,
    /// Renders `/metrics`; `None` if another recorder was installed first (a test's).
    pub metrics: Option<&'static metrics_exporter_prometheus::PrometheusHandle>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/game", get(game))
        .route("/admin", get(admin))
        .route("/socket/websocket", get(websocket))
        .route("/api/rooms", get(rooms))
        .route("/metrics", get(metrics_text))
        .route("/api/auth", get(auth_required))
        .route("/api/token/refresh", axum::routing::post(refresh_token))
        .route("/healthz", get(healthz))
        .merge(super::admin::routes())
        .with_state(state)
}

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

/// The tic-tac-toe page, for the `game` kind (rooms/tic-tac-toe.js).
async fn game() -> Html<&'static str> {
    Html(GAME_HTML)
}

/// The operators' dashboard. What it shows comes from the admin API and `/metrics`, which
/// answer loopback or a Bearer token (the page takes it from `#token=`, which a browser never
/// sends). Without an `--admin-token` nobody remote could use it, so it answers loopback only.
async fn admin(State(state): State<AppState>, ConnectInfo(peer): ConnectInfo<SocketAddr>) -> Response {
    if state.admin_token.is_none() && !peer.ip().is_loopback() {
        return (StatusCode::FORBIDDEN, "the dashboard is for operators").into_response();
    }
    Html(ADMIN_HTML).into_response()
}

/// Bytes read from a socket at a time.
const READ_BUFFER_BYTES: usize = 4 * 1024;
/// Room above the outbound byte limit for tungstenite's own write buffer: one flush's worth
/// (its default write buffer is 128 KiB) and the frames' headers.
const WRITE_BUFFER_SLACK: usize = 256 * 1024;

async fn websocket(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(slot): Extension<ConnectionSlot>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if let Err(vsn) = check_vsn(query.as_deref()) {
        tracing::warn!(vsn, "refused a WebSocket upgrade for an unsupported protocol version");
        return (StatusCode::FORBIDDEN, "unsupported vsn: this server speaks Phoenix Channels 2.0.0")
            .into_response();
    }
    let config = &state.socket.config;
    let origin = headers.get(header::ORIGIN).map(|o| o.to_str().unwrap_or("(not text)"));
    if let Err(origin) = state.origins.check(origin) {
        tracing::warn!(origin, "refused a WebSocket upgrade from a foreign origin");
        ::metrics::counter!(super::metrics::REFUSALS, "reason" => "origin").increment(1);
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let mut context = state.socket.clone();
    if let Some(auth) = &state.socket.auth {
        let protocols = headers.get(header::SEC_WEBSOCKET_PROTOCOL).and_then(|p| p.to_str().ok());
        let token = presented_token(query.as_deref(), protocols).unwrap_or_default();
        match auth.verify(&token) {
            Ok(user) => context.user = Some(Arc::new(user)),
            Err(why) => {
                // The reason, never the token: a log is no place for credentials.
                tracing::warn!(peer = %peer.ip(), "refused a WebSocket upgrade with {why}");
                ::metrics::counter!(super::metrics::REFUSALS, "reason" => "auth").increment(1);
                return (StatusCode::FORBIDDEN, format!("refused: {why}")).into_response();
            }
        }
    }
    let Some(pass) = state.sockets_per_address.admit(peer.ip()) else {
        tracing::warn!(peer = %peer.ip(), "refused a WebSocket upgrade: too many sockets from one address");
        return (StatusCode::TOO_MANY_REQUESTS, "too many sockets from this address").into_response();
    };
    let limit = config.max_frame_bytes;
    let connections = state.connections.clone();
    upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        // tungstenite reserves its 128 KiB default up front for every socket, which made an
        // idle socket cost ~146 KiB of gateway RSS (loadgen `idle`). Chat frames are small;
        // the buffer still grows to fit a larger frame, up to the limit above.
        .read_buffer_size(READ_BUFFER_BYTES)
        // What tungstenite buffers for writing (frames the writer handed over, pongs it queued
        // itself) is bounded too: past it the socket fails and closes instead of growing.
        .max_write_buffer_size(config.outbound_queue_bytes.saturating_add(WRITE_BUFFER_SLACK))
        // phoenix.js offers the `phoenix` subprotocol (beside its token) when given an
        // `authToken`; a browser drops a handshake whose answer selects none of those offered.
        .protocols(["phoenix"])
        .on_upgrade(move |ws| {
            connections.track_future(async move {
                socket::serve(ws, context).await;
                drop((pass, slot));
            })
        })
}

/// Whether sockets must present a token: the page asks before it connects.
async fn auth_required(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "required": state.socket.auth.is_some() }))
}

/// A fresh token for a still-valid one (`Authorization: Bearer <token>`): what a page calls
/// before its token runs out, so its next connection has one (phoenix.js `params` as a
/// function). It only extends an identity the gateway already signed, and never past a day
/// from the first sign-in.
async fn refresh_token(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(auth) = &state.socket.auth else {
        return (StatusCode::NOT_FOUND, "this gateway has no tokens").into_response();
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or_default();
    match auth.refresh(presented) {
        Ok((token, expires_at)) => Json(json!({ "token": token, "expires_at": expires_at })).into_response(),
        Err(why) => {
            tracing::info!("refused a token refresh with {why}");
            (StatusCode::UNAUTHORIZED, format!("refused: {why}")).into_response()
        }
    }
}

/// Only the v2 serializer is spoken. Like Phoenix, a client asking for another version is
/// refused at the upgrade rather than sent frames it would misread; a client that names no
/// version gets v2.
fn check_vsn(query: Option<&str>) -> Result<(), String> {
    let vsn = query.unwrap_or_default().split('&').find_map(|pair| pair.strip_prefix("vsn="));
    match vsn {
        None => Ok(()),
        Some(v) if v == "2" || v.starts_with("2.") => Ok(()),
        Some(other) => Err(other.to_owned()),
    }
}

/// The counters in the Prometheus text format: for operators, like `/api/rooms`.
async fn metrics_text(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if !is_operator(&state, peer, &headers) {
        tracing::warn!(peer = %peer.ip(), "refused /metrics to a remote client without the API token");
        return (StatusCode::FORBIDDEN, "metrics are for operators").into_response();
    }
    let Some(handle) = state.metrics else {
        return (StatusCode::SERVICE_UNAVAILABLE, "metrics are not recorded").into_response();
    };
    // A gauge read at scrape time rather than kept up to date on every start and exit.
    ::metrics::gauge!(super::metrics::ROOMS_LIVE).set(state.socket.supervisor.live_room_count() as f64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}

/// Loopback, or anyone presenting the `--api-token`.
fn is_operator(state: &AppState, peer: SocketAddr, headers: &HeaderMap) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    let token_ok =
        matches!((&state.api_token, presented), (Some(token), Some(given)) if same_secret(token, given));
    peer.ip().is_loopback() || token_ok
}

/// Every room and its worker's pid: for operators, so only from this machine or with the
/// `--api-token`.
async fn rooms(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if !is_operator(&state, peer, &headers) {
        tracing::warn!(peer = %peer.ip(), "refused /api/rooms to a remote client without the API token");
        return (StatusCode::FORBIDDEN, "the rooms API is for operators").into_response();
    }
    let supervisor = &state.socket.supervisor;
    match &state.cluster {
        Some(cluster) => Json(cluster.rooms(supervisor).await).into_response(),
        None => Json(supervisor.rooms()).into_response(),
    }
}

/// Compares without stopping at the first difference, so timing does not reveal how much of a
/// guess was right.
pub(super) fn same_secret(expected: &str, given: &str) -> bool {
    expected.len() == given.len()
        && expected.bytes().zip(given.bytes()).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

/// 200 with `"status": "ok"` when ready; 503 while shutting down or, in a cluster, while NATS
/// is unreachable (rooms this node does not already run cannot be reached then).
/// How long `/healthz` waits for the store to count its rooms.
const STORAGE_HEALTH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

async fn healthz(State(state): State<AppState>) -> Response {
    let supervisor = &state.socket.supervisor;
    let mut body = json!({
        "status": "ok",
        "rooms": supervisor.live_room_count(),
        "warm_workers": supervisor.warm_workers(),
    });
    let mut ready = true;
    if let Some(storage) = supervisor.storage() {
        // Rooms that keep state, live or not: far more can exist than run.
        let known = tokio::time::timeout(STORAGE_HEALTH_WAIT, storage.store.rooms(0)).await;
        let stored = match known {
            Ok(Ok(Ok((count, _)))) => json!(count),
            _ => {
                ready = false;
                body["status"] = json!("storage unavailable");
                json!(null)
            }
        };
        body["storage"] = json!({ "rooms_stored": stored, "alarms": storage.alarms.len() });
    }
    if let Some(cluster) = &state.cluster {
        let nats = if cluster.is_connected() { "connected" } else { "disconnected" };
        // The cluster's storage opens a moment after the leases: until it has, rooms could be
        // claimed but not loaded.
        let storage = supervisor.storage().is_none_or(|storage| storage.store.is_ready());
        ready = ready && cluster.is_ready() && storage;
        body["cluster"] =
            json!({ "node": cluster.node().as_str(), "nats": nats, "storage": storage, "ready": ready });
        if !ready {
            body["status"] = json!("not ready");
        }
    }
    if state.socket.shutdown.is_triggered() {
        ready = false;
        body["status"] = json!("shutting down");
    }
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_version_2_of_the_serializer_is_accepted() {
        assert!(check_vsn(Some("vsn=2.0.0")).is_ok());
        assert!(check_vsn(Some("token=x&vsn=2.0.0")).is_ok());
        assert!(check_vsn(None).is_ok());
        assert_eq!(check_vsn(Some("vsn=1.0.0")), Err("1.0.0".to_owned()));
        assert_eq!(check_vsn(Some("a=1&vsn=3.0.0")), Err("3.0.0".to_owned()));
    }

    #[test]
    fn secrets_match_only_exactly() {
        assert!(same_secret("s3cret", "s3cret"));
        assert!(!same_secret("s3cret", "s3cre"));
        assert!(!same_secret("s3cret", "s3creT"));
    }
}
