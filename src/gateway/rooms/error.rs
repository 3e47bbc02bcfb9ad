//! Why a room could not answer, as one type that every layer speaks: the supervisor, the
//! room's process, the cluster and the transport. [`RoomError::reason`] is the one place that
//! turns it into the text clients see.

use std::sync::Arc;

use crate::gateway::ids::NodeId;
use crate::wire::{ScriptError, ScriptErrorKind};

#[derive(Debug, Clone)]
pub enum RoomError {
    RoomLimit,
    CrashLooping,
    /// The room's call queue is full.
    Busy,
    /// The caller has started as many live rooms as it may.
    StartQuota,
    Timeout,
    WorkerExited,
    /// A call of the script failed (it threw, refused, ran out of time or memory).
    Script(ScriptError),
    /// The script failed while the runtime started (a syntax error, a throw at top level).
    StartFailed(ScriptError),
    /// The gateway is shutting down and starts no more rooms.
    ShuttingDown,
    /// The room script could not be read.
    ScriptUnreadable(Arc<std::io::Error>),
    /// The room-worker executable could not be found.
    WorkerNotFound(Arc<std::io::Error>),
    /// The worker process could not be started.
    SpawnFailed(Arc<std::io::Error>),
    /// Where the room runs could not be settled (in a cluster).
    Placement(PlacementError),
    /// In a cluster: another node holds the room's lease.
    OwnedElsewhere,
    /// A durable room's store failed (full, read-only, unreachable): what the call did was
    /// not kept, and nothing it caused was sent. The cause is in the log.
    StorageUnavailable,
    /// Starting the room would leave too few open files for sockets and operators; carries
    /// the figures, for the log.
    AtCapacity(String),
}

/// Why the cluster could not say where a room runs, or reach it there.
#[derive(Debug, Clone)]
pub enum PlacementError {
    /// Not connected to the cluster, or its lease store is not open yet.
    NotReady,
    /// The cluster failed to answer; carries the cause.
    Failed(Arc<dyn std::error::Error + Send + Sync>),
    /// The node that runs the room is gone.
    NodeGone(NodeId),
    /// The room's lease moved on every time it was looked up.
    Contended,
    /// The node that runs the room could not reach it, for the reason it gave.
    Remote(String),
}

impl RoomError {
    /// What clients are told: the gateway's own refusals are short fixed phrases, a script's
    /// `Room.refuse(reason)` passes through, and its exceptions are "internal error".
    pub fn reason(&self) -> String {
        match self {
            RoomError::RoomLimit => "room limit reached".to_owned(),
            RoomError::CrashLooping => "room is crash-looping".to_owned(),
            RoomError::Busy => "room busy".to_owned(),
            RoomError::StartQuota => "too many rooms started by this socket".to_owned(),
            RoomError::Timeout => "timeout".to_owned(),
            RoomError::WorkerExited => "room worker exited".to_owned(),
            RoomError::Script(e) => match e.kind {
                ScriptErrorKind::Timeout => "timeout".to_owned(),
                ScriptErrorKind::OutOfMemory => "out of memory".to_owned(),
                // `Room.refuse(reason)`: written for the client.
                ScriptErrorKind::Refused => e.message.clone(),
                // Anything else the script threw is the room's bug; its message and stack
                // are for the log (see `detail`), which may hold what the client must not see.
                ScriptErrorKind::Exception => "internal error".to_owned(),
                ScriptErrorKind::UnknownConnection => "unmatched topic".to_owned(),
            },
            RoomError::StartFailed(_) => "room unavailable: the room script failed to start".to_owned(),
            RoomError::ShuttingDown => "room unavailable: the gateway is shutting down".to_owned(),
            // The causes below name files and OS errors: they go to the log (see `detail`),
            // never to a client.
            RoomError::ScriptUnreadable(_) => "room unavailable: cannot read the room script".to_owned(),
            RoomError::WorkerNotFound(_) | RoomError::SpawnFailed(_) => {
                "room unavailable: cannot start a room worker".to_owned()
            }
            RoomError::Placement(PlacementError::Failed(_)) => "room unavailable: cluster error".to_owned(),
            RoomError::Placement(PlacementError::Remote(reason)) => reason.clone(),
            RoomError::Placement(e) => format!("room unavailable: {e}"),
            RoomError::OwnedElsewhere => "room is owned by another node".to_owned(),
            RoomError::StorageUnavailable => "storage unavailable".to_owned(),
            RoomError::AtCapacity(_) => "room unavailable: the server is at capacity".to_owned(),
        }
    }

    /// The reason with its causes, for the log: what an operator needs and a client must not see.
    pub fn detail(&self) -> String {
        if let RoomError::AtCapacity(figures) = self {
            return format!("{}: {figures}", self.reason());
        }
        if let RoomError::Script(e) | RoomError::StartFailed(e) = self {
            let stack = e.stack.as_deref().map(|s| format!("\n{s}")).unwrap_or_default();
            return format!("{}{stack}", e.message);
        }
        let mut detail = self.reason();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            detail.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        detail
    }

    /// Whether a failed start counts towards the crash-loop guard: only when the room's own
    /// worker or script failed, not when the gateway or the cluster could not try.
    pub fn is_room_failure(&self) -> bool {
        matches!(
            self,
            RoomError::Script(_) | RoomError::StartFailed(_) | RoomError::WorkerExited | RoomError::Timeout
        )
    }
}

impl std::fmt::Display for RoomError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason())
    }
}

impl std::error::Error for RoomError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RoomError::ScriptUnreadable(e) | RoomError::WorkerNotFound(e) | RoomError::SpawnFailed(e) => {
                Some(&**e)
            }
            RoomError::Placement(e) => Some(e),
            _ => None,
        }
    }
}

impl From<PlacementError> for RoomError {
    fn from(error: PlacementError) -> Self {
        RoomError::Placement(error)
    }
}

impl std::fmt::Display for PlacementError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlacementError::NotReady => f.write_str("not connected to the cluster"),
            PlacementError::Failed(_) => f.write_str("cluster error"),
            PlacementError::NodeGone(node) => {
                write!(f, "its node {node} is gone; the room starts again once its lease runs out")
            }
            PlacementError::Contended => f.write_str("the room's lease keeps changing hands; try again"),
            PlacementError::Remote(reason) => f.write_str(reason),
        }
    }
}

impl std::error::Error for PlacementError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PlacementError::Failed(e) => Some(&**e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_never_see_paths_or_os_errors_but_the_log_does() {
        let io = || {
            Arc::new(std::io::Error::other(
                "cannot read room script /srv/secret/room.js: Too many open files",
            ))
        };
        let lease = PlacementError::Failed(Arc::new(std::io::Error::other(
            "nats://10.0.0.7:4222: Connection refused",
        )));
        for error in [
            RoomError::ScriptUnreadable(io()),
            RoomError::WorkerNotFound(io()),
            RoomError::SpawnFailed(io()),
            RoomError::Placement(lease),
        ] {
            let reason = error.reason();
            assert!(
                !reason.contains('/') && !reason.contains("Too many") && !reason.contains("refused"),
                "{reason}"
            );
            assert!(error.detail().len() > reason.len(), "the log keeps the cause: {}", error.detail());
        }
    }
}
