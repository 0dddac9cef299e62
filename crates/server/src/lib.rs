//! numstream server library: everything the `numstream-server` binary does,
//! callable in-process by tests and benchmarks.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let store = Arc::new(numstream_store::InMemoryStore::new(100_000));
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! numstream_server::run(listener, store, numstream_server::ServerConfig::default(), shutdown).await?;
//! # Ok(()) }
//! ```

mod config;
mod connection;
mod lease;
mod registry;
mod server;
mod socket;

pub use config::ServerConfig;
pub use server::{ServerError, run};
