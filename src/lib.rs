//! roomvisor: real-time chat where every room is a JavaScript runtime in its own supervised
//! OS process, reached through the Phoenix Channels v2 protocol.
//!
//! The gateway side: [`http`] serves the page and the WebSocket, [`socket`] speaks
//! [`phoenix`] frames, [`pubsub`] fans broadcasts out, [`supervisor`] starts and reaps
//! [`room`] workers. The worker side: [`worker`] drives an [`engine`] over [`ipc`] frames.

pub mod cluster;
pub mod config;
pub mod engine;
pub mod gateway;
pub mod http;
pub mod ipc;
pub mod phoenix;
pub mod pubsub;
pub mod room;
pub mod shutdown;
pub mod socket;
pub mod supervisor;
pub mod worker;
