//! The wire between the two processes: what the gateway and a room worker say to each other
//! over the worker's stdin/stdout, and the rest of the contract a worker is started under.
//! Both sides import this module; it imports neither.

mod codec;
mod frames;
mod process;

pub use codec::{decode, encode, length_codec, CodecError, FrameCodec, GatewayCodec, WorkerCodec};
pub use frames::{
    EngineKind, FromWorker, LogLevel, RuntimeLimits, ScriptError, ScriptErrorKind, StorageInit, ToWorker,
    WorkerStats,
};
pub use process::{invoked_as_worker, DEFAULT_MAX_FRAME_BYTES, PARENT_PID_ENV, WORKER_ARGV0};
