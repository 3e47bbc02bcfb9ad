//! The gateway process: HTTP and the Phoenix socket in front, the PubSub and the room
//! supervisor behind, the cluster beside. This module starts it all and shuts it down in
//! order.

mod admin;
pub mod auth;
pub(crate) mod cluster;
pub mod config;
pub mod descriptors;
pub mod hooks;
mod http;
pub mod ids;
mod listener;
mod metrics;
mod origin;
pub mod phoenix;
pub mod presence;
pub mod pubsub;
mod quota;
pub mod rooms;
mod shutdown;
mod socket;
pub mod storage;
pub mod typescript;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use cluster::Cluster;
use config::Config;
use http::AppState;
use pubsub::PubSub;
use rooms::Supervisor;
use shutdown::{termination_signal, Shutdown};
use socket::SocketContext;

/// How long open sockets get to receive their close frame before workers are stopped.
const SOCKET_CLOSE_GRACE: Duration = Duration::from_secs(2);

pub fn main() -> ExitCode {
    let config = Config::parse();
    if let Some(config::Command::Token { sub, name, ttl, claims }) = &config.command {
        return print_token(&config, sub, name.as_deref(), *ttl, claims.clone().unwrap_or_default());
    }
    // What clap cannot check flag by flag: the room kinds together, and where rooms are kept.
    if let Err(e) = config.kinds().and_then(|_| config.storage_choice()) {
        eprintln!("gateway: {e}");
        return ExitCode::from(2);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match config.log_format {
        config::LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        config::LogFormat::Json => logs.json().with_current_span(true).with_span_list(false).init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("gateway: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("gateway failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `gateway token`: a token signed with the configured secret, on stdout.
fn print_token(
    config: &Config,
    sub: &str,
    name: Option<&str>,
    ttl: Duration,
    claims: serde_json::Map<String, serde_json::Value>,
) -> ExitCode {
    let Some(secret) = &config.auth_secret else {
        eprintln!("gateway token: needs the secret: --auth-secret or ROOMVISOR_AUTH_SECRET");
        return ExitCode::from(2);
    };
    match auth::Auth::new(&secret.0).mint(sub, name, ttl, &claims) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gateway token: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves until SIGTERM or SIGINT, then closes sockets with 1001, stops every worker, and
/// returns.
pub async fn run(config: Config) -> std::io::Result<()> {
    // Before anything counts: a counter bumped with no recorder installed is lost.
    let metrics = metrics::install();
    let open_files = descriptors::raise_limit();
    let limits = listener::ConnectionLimits::new(
        config.max_connections,
        open_files,
        config.max_rooms,
        config.request_head_timeout(),
    );
    let listener = TcpListener::bind((config.bind, config.port)).await?;
    let address = listener.local_addr()?;
    let config = Arc::new(config);
    let pubsub = PubSub::new();
    let cluster = match &config.cluster {
        None => None,
        Some(url) => {
            let node =
                config.node_id.as_deref().map(rooms::NodeId::new).unwrap_or_else(cluster::default_node_id);
            let cluster = Cluster::connect(url, node, config.cluster_lease(), pubsub.clone())
                .await
                .map_err(std::io::Error::other)?;
            tracing::info!(node = %cluster.node(), "joining the cluster at {url}");
            Some(cluster)
        }
    };
    // In a cluster rooms are always durable, in JetStream: a room moves to another node when
    // its owner dies, and must find its data there. Alone, only with --data-dir.
    let storage = match (&cluster, &config.data_dir, &config.cluster) {
        (Some(cluster), _, Some(url)) => Some(storage::Storage::in_cluster(
            cluster.client(),
            url,
            config.cluster_replicas,
            config.room_storage_bytes,
            config.cluster_lease(),
        )),
        (None, Some(dir), _) => Some(
            storage::Storage::open_dir(dir, config.data_max_bytes, config.room_storage_bytes)
                .map_err(std::io::Error::other)?,
        ),
        _ => None,
    };
    if let Some(storage) = &storage {
        tracing::info!("durable rooms: {}", storage.store.describe());
    }
    let supervisor =
        Supervisor::with_placement(config.clone(), pubsub, cluster.as_ref().map(Cluster::placement), storage);
    if let Some(cluster) = &cluster {
        cluster.start(supervisor.clone());
    }
    let durable_tasks = supervisor.start_durable_tasks().await;
    let shutdown = Shutdown::new();
    let connections = TaskTracker::new();
    let state = AppState {
        socket: SocketContext {
            supervisor: supervisor.clone(),
            config: config.clone(),
            shutdown: shutdown.clone(),
            auth: config.auth_secret.as_ref().map(|secret| auth::Auth::new(&secret.0)),
            user: None,
            // Replaced by each connection's own.
            caller: rooms::Caller {
                id: rooms::ClientId::next(),
                max_started: config.max_rooms_started_per_socket,
            },
        },
        cluster,
        origins: origin::OriginPolicy::new(address, &config.allowed_origins),
        sockets_per_address: quota::SocketsPerAddress::new(config.max_sockets_per_address),
        api_token: config.api_token.clone(),
        admin_token: config.admin_token.clone(),
        metrics,
        connections: connections.clone(),
    };

    if let Ok(kinds) = config.kinds() {
        let kinds: Vec<String> =
            kinds.iter().map(|k| format!("{}:* -> {}", k.prefix, k.script.display())).collect();
        tracing::info!("room kinds: {}", kinds.join(", "));
    }
    // Tests and scripts read this line to learn the port when started with --port 0.
    println!("roomvisor gateway listening on http://{address}");
    tracing::info!(
        pid = std::process::id(),
        "listening on http://{address} (at most {} connections, {} open files)",
        limits.max_connections,
        open_files
    );

    let trigger = shutdown.clone();
    tokio::spawn(async move {
        match termination_signal().await {
            Ok(signal) => tracing::info!("{signal} received; shutting down"),
            Err(e) => tracing::error!("cannot listen for signals ({e}); shutting down"),
        }
        trigger.trigger();
    });
    listener::serve(listener, http::router(state), limits, shutdown.clone(), connections.clone()).await;

    shutdown.trigger();
    connections.close();
    // Sockets close and workers stop side by side, so the whole shutdown stays within the
    // workers' grace (5 s by default) even when a client never answers its close frame.
    let sockets_closed = async {
        if tokio::time::timeout(SOCKET_CLOSE_GRACE, connections.wait()).await.is_err() {
            tracing::warn!("some sockets did not close in time");
        }
    };
    for task in durable_tasks {
        task.abort();
    }
    tokio::join!(sockets_closed, supervisor.shutdown(config.shutdown_grace()));
    tracing::info!("gateway stopped");
    Ok(())
}
