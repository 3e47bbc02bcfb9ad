//! The operator's counters, served at `GET /metrics` in the Prometheus text format through the
//! `metrics` facade and its Prometheus exporter. Names and labels follow Prometheus style;
//! no label takes values a client chooses (no room ids).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const SOCKETS_OPEN: &str = "roomvisor_sockets_open";
pub const JOINS: &str = "roomvisor_joins_total";
pub const FRAMES_IN: &str = "roomvisor_frames_in_total";
pub const FRAMES_OUT: &str = "roomvisor_frames_out_total";
pub const BYTES_OUT: &str = "roomvisor_bytes_out_total";
pub const ROOMS_LIVE: &str = "roomvisor_rooms_live";
pub const WORKER_STARTS: &str = "roomvisor_worker_starts_total";
pub const WORKER_EXITS: &str = "roomvisor_worker_exits_total";
pub const CRASH_LOOP_REFUSALS: &str = "roomvisor_crash_loop_refusals_total";
pub const CALL_SECONDS: &str = "roomvisor_call_duration_seconds";
pub const REFUSALS: &str = "roomvisor_refusals_total";
pub const NATS_CONNECTED: &str = "roomvisor_nats_connected";
pub const REMOTE_CALLS: &str = "roomvisor_remote_calls_total";
pub const STORAGE_FAILURES: &str = "roomvisor_storage_failures_total";
pub const HIBERNATIONS: &str = "roomvisor_hibernations_total";
pub const ALARMS_FIRED: &str = "roomvisor_alarms_fired_total";

/// Call latencies from 0.5 ms to 10 s: a room answers in about a millisecond, and the hard
/// limit is 10 s.
const CALL_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 10.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder (once per process); later calls return the same handle.
pub fn install() -> Option<&'static PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Some(handle);
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(CALL_SECONDS.to_owned()),
            &CALL_BUCKETS,
        )
        .ok()?
        .build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        return HANDLE.get();
    }
    describe();
    Some(HANDLE.get_or_init(|| handle))
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(SOCKETS_OPEN, "WebSocket connections open now");
    describe_counter!(JOINS, "channel joins, by result (ok, refused by the room, failed)");
    describe_counter!(FRAMES_IN, "frames received from clients");
    describe_counter!(FRAMES_OUT, "frames written to clients");
    describe_counter!(BYTES_OUT, Unit::Bytes, "bytes of frames written to clients");
    describe_gauge!(ROOMS_LIVE, "rooms with a live worker on this node");
    describe_counter!(WORKER_STARTS, "room worker processes started");
    describe_counter!(WORKER_EXITS, "room worker processes ended, by reason");
    describe_counter!(CRASH_LOOP_REFUSALS, "room starts refused because the room is crash-looping");
    describe_histogram!(CALL_SECONDS, Unit::Seconds, "calls into a room, by kind, from asking to the answer");
    describe_counter!(REFUSALS, "requests refused by the gateway, by reason");
    describe_gauge!(NATS_CONNECTED, "1 while connected to the cluster's NATS, else 0");
    describe_counter!(REMOTE_CALLS, "calls into rooms that run on other nodes");
    describe_counter!(
        STORAGE_FAILURES,
        "durable rooms' writes the store refused (each ends the room's worker)"
    );
    describe_counter!(HIBERNATIONS, "durable rooms stopped after --room-idle-ms without use");
    describe_counter!(ALARMS_FIRED, "alarms of durable rooms run, by result (ok, failed)");
}

/// The kind of a call, for the latency histogram's label.
pub fn call_kind(function: &str) -> &'static str {
    match function {
        crate::gateway::hooks::JOIN => "join",
        crate::gateway::hooks::EVENT => "event",
        crate::gateway::hooks::LEAVE => "leave",
        crate::gateway::hooks::ALARM => "alarm",
        _ => "function",
    }
}
