//! HTTP routes: the chat page, the Phoenix WebSocket endpoint, and the operator API.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::task::TaskTracker;

use crate::socket::{self, SocketContext};

const INDEX_HTML: &str = include_str!("../static/index.html");

#[derive(Clone)]
pub struct AppState {
    pub socket: SocketContext,
    /// Upgraded connections outlive their HTTP request; shutdown waits for them here.
    pub connections: TaskTracker,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/socket/websocket", get(websocket))
        .route("/api/rooms", get(rooms))
        .route("/healthz", get(healthz))
        .with_state(state)
}

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

async fn websocket(State(state): State<AppState>, headers: HeaderMap, upgrade: WebSocketUpgrade) -> Response {
    let config = &state.socket.config;
    if let Err(origin) = check_origin(&headers, &config.allowed_origins) {
        tracing::warn!(origin, "refused a WebSocket upgrade from a foreign origin");
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let limit = config.max_frame_bytes;
    let context = state.socket.clone();
    let connections = state.connections.clone();
    upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        // phoenix.js offers the `phoenix` subprotocol (beside its token) when given an
        // `authToken`; a browser drops a handshake whose answer selects none of those offered.
        .protocols(["phoenix"])
        .on_upgrade(move |ws| connections.track_future(socket::serve(ws, context)))
}

/// Browsers send `Origin`; it must name the host the request was made to, or an allowed
/// origin. Clients without an `Origin` (not browsers) are let through.
fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or_default().trim_end_matches('/');
    if allowed.iter().any(|a| a.trim_end_matches('/') == origin) {
        return Ok(());
    }
    let origin_host = origin.split_once("://").map(|(_, host)| host);
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (origin_host, host) {
        (Some(origin_host), Some(host)) if origin_host.eq_ignore_ascii_case(host) => Ok(()),
        _ => Err(origin.to_owned()),
    }
}

async fn rooms(State(state): State<AppState>) -> impl IntoResponse {
    Json(state.socket.supervisor.rooms())
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let status = if state.socket.shutdown.is_triggered() { "shutting down" } else { "ok" };
    Json(json!({ "status": status, "rooms": state.socket.supervisor.live_room_count() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(origin: Option<&'static str>, host: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static(host));
        if let Some(origin) = origin {
            headers.insert(header::ORIGIN, HeaderValue::from_static(origin));
        }
        headers
    }

    #[test]
    fn origin_must_match_the_host_or_be_allowed() {
        assert!(check_origin(&headers(None, "localhost:4000"), &[]).is_ok());
        assert!(check_origin(&headers(Some("http://localhost:4000"), "localhost:4000"), &[]).is_ok());
        assert!(check_origin(&headers(Some("http://evil.example"), "localhost:4000"), &[]).is_err());
        let allowed = vec!["https://chat.example".to_owned()];
        assert!(check_origin(&headers(Some("https://chat.example"), "localhost:4000"), &allowed).is_ok());
    }
}
