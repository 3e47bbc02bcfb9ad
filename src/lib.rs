//! roomvisor: real-time rooms where every room is a JavaScript runtime in its own supervised
//! OS process, reached through the Phoenix Channels v2 protocol.
//!
//! Two processes and a wire between them:
//!
//! - [`gateway`]: one process. The accept loop (`gateway::listener`), HTTP and the WebSocket
//!   upgrade (`gateway::http`, `gateway::origin`, `gateway::quota`), Phoenix frames and the
//!   socket's writer (`gateway::phoenix`), one task per connection and per joined channel
//!   (`gateway::socket`), the chat application's rules (`gateway::chat`), the PubSub
//!   (`gateway::pubsub`), the rooms and their supervisor (`gateway::rooms`), and the cluster
//!   over NATS (`gateway::cluster`).
//! - [`worker`]: one process per live room. The poll loop, the pipe to the gateway, and the
//!   JavaScript engine behind `worker::engine`.
//! - [`wire`]: what the two say to each other, and how a worker is started; imported by
//!   both, importing neither.

pub mod gateway;
mod util;
pub mod wire;
pub mod worker;
