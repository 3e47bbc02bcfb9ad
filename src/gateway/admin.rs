//! The operators' admin API, JSON under `/api/admin/`: every live room of this node with its
//! worker's memory and CPU from `/proc`, and per room: kill the worker (the reset that
//! follows is the usual one), stop it, read its console, call a function of its script.
//! Loopback only, or with `--admin-token`.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::http::{same_secret, AppState};
use super::rooms::{RoomHandle, RoomId, RoomInfo};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/admin/rooms", get(rooms))
        .route("/api/admin/rooms/{kind}/{id}/kill", post(kill))
        .route("/api/admin/rooms/{kind}/{id}/stop", post(stop))
        .route("/api/admin/rooms/{kind}/{id}/logs", get(logs))
        .route("/api/admin/rooms/{kind}/{id}/call", post(call))
}

/// A live room with what `/proc` says of its worker.
#[derive(Serialize)]
struct AdminRoom {
    #[serde(flatten)]
    info: RoomInfo,
    uptime_ms: Option<u64>,
    rss_bytes: Option<u64>,
    cpu_ms: Option<u64>,
    /// JS heap in use, as the engine counts it; null when the worker is too busy to say.
    heap_used_bytes: Option<u64>,
}

/// How long a worker gets to report its heap: a busy one is shown without it.
const HEAP_READING_WAIT: std::time::Duration = std::time::Duration::from_millis(300);

/// Why a request is turned down: a status and a short reason (small, unlike a `Response`).
type Refused = (StatusCode, &'static str);

fn allowed(state: &AppState, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Refused> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    let token_ok =
        matches!((&state.admin_token, presented), (Some(token), Some(given)) if same_secret(token, given));
    if peer.ip().is_loopback() || token_ok {
        return Ok(());
    }
    tracing::warn!(peer = %peer.ip(), "refused the admin API to a remote client without the admin token");
    Err((StatusCode::FORBIDDEN, "the admin API is for operators"))
}

async fn rooms(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = allowed(&state, peer, &headers) {
        return refused.into_response();
    }
    let now = crate::util::epoch_ms();
    let supervisor = &state.socket.supervisor;
    let readings = supervisor.rooms().into_iter().map(|info| async move {
        let usage = info.pid.and_then(proc_usage);
        let room = RoomId::in_kind(&info.kind, &info.id).ok();
        let handle = room.and_then(|room| supervisor.live_handle(&room));
        let heap = match handle {
            Some(handle) => handle.stats(HEAP_READING_WAIT).await.map(|stats| stats.heap_used_bytes),
            None => None,
        };
        AdminRoom {
            uptime_ms: info.started_at.map(|at| now.saturating_sub(at)),
            rss_bytes: usage.map(|u| u.0),
            cpu_ms: usage.map(|u| u.1),
            heap_used_bytes: heap,
            info,
        }
    });
    let rooms: Vec<AdminRoom> = futures_util::future::join_all(readings).await;
    Json(rooms).into_response()
}

/// For an operator's request about one room: the room, live on this node; or why not.
fn operator_room(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    kind: &str,
    id: &str,
) -> Result<(RoomId, RoomHandle), Refused> {
    allowed(state, peer, headers)?;
    live_room(state, kind, id)
}

/// The room a path names, live on this node; or why not, as the answer to give.
fn live_room(state: &AppState, kind: &str, id: &str) -> Result<(RoomId, RoomHandle), Refused> {
    if !state.socket.config.has_kind(kind) {
        return Err((StatusCode::NOT_FOUND, "no such room kind"));
    }
    let room = RoomId::in_kind(kind, id).map_err(|_| (StatusCode::BAD_REQUEST, "invalid room id"))?;
    match state.socket.supervisor.live_handle(&room) {
        Some(handle) => Ok((room, handle)),
        None => Err((StatusCode::NOT_FOUND, "the room is not running here")),
    }
}

async fn kill(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path((kind, id)): Path<(String, String)>,
) -> Response {
    match operator_room(&state, peer, &headers, &kind, &id) {
        Ok((room, handle)) => {
            tracing::warn!(room = %room, pid = handle.pid, "an operator killed the room's worker");
            handle.kill();
            Json(json!({ "killed": handle.pid })).into_response()
        }
        Err(refused) => refused.into_response(),
    }
}

async fn stop(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path((kind, id)): Path<(String, String)>,
) -> Response {
    match operator_room(&state, peer, &headers, &kind, &id) {
        Ok((room, handle)) => {
            tracing::info!(room = %room, pid = handle.pid, "an operator stopped the room");
            handle.shutdown().await;
            Json(json!({ "stopping": handle.pid })).into_response()
        }
        Err(refused) => refused.into_response(),
    }
}

async fn logs(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path((kind, id)): Path<(String, String)>,
) -> Response {
    if let Err(refused) = allowed(&state, peer, &headers) {
        return refused.into_response();
    }
    if !state.socket.config.has_kind(&kind) {
        return (StatusCode::NOT_FOUND, "no such room kind").into_response();
    }
    match RoomId::in_kind(&kind, &id) {
        Ok(room) => Json(json!({ "lines": state.socket.supervisor.console(&room) })).into_response(),
        Err(_) => (StatusCode::BAD_REQUEST, "invalid room id").into_response(),
    }
}

#[derive(Deserialize)]
struct CallRequest {
    function: String,
    #[serde(default)]
    args: Vec<serde_json::Value>,
}

/// Calls a top-level function of the room's script, as the gateway can (design §5): e.g.
/// `{"function": "sendMessage", "args": ["operator", "back in five"]}` posts into a chat.
async fn call(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path((kind, id)): Path<(String, String)>,
    Json(request): Json<CallRequest>,
) -> Response {
    let (_, handle) = match operator_room(&state, peer, &headers, &kind, &id) {
        Ok(found) => found,
        Err(refused) => return refused.into_response(),
    };
    let args = serde_json::Value::from(request.args).to_string();
    match handle.call(&request.function, args).await {
        Ok(result) => match serde_json::from_str::<serde_json::Value>(&result) {
            Ok(result) => Json(json!({ "result": result })).into_response(),
            Err(_) => {
                (StatusCode::BAD_GATEWAY, "the room answered with something that is not JSON").into_response()
            }
        },
        // The operator may see the script's own message, which clients never do.
        Err(e) => {
            (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "error": e.reason(), "detail": e.detail() })))
                .into_response()
        }
    }
}

/// Resident memory (bytes) and CPU time (ms) of a process, from `/proc`.
fn proc_usage(pid: u32) -> Option<(u64, u64)> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as u64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces, end with its ')'.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    let ticks =
        nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100).max(1) as u64;
    Some((resident_pages * page, (utime + stime) * 1000 / ticks))
}
