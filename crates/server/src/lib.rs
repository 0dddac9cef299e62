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

//!
//! With metrics ([`Telemetry`]) and the status endpoint (`/metrics`,
//! `/healthz`, `/readyz`), as the binary runs it with `--metrics-addr`:
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use numstream_server::{InstrumentedStore, Status, Telemetry};
//! let recorder = numstream_server::prometheus_recorder();
//! let metrics = recorder.handle();
//! let store: Arc<dyn numstream_store::SessionStore> =
//!     Arc::new(numstream_store::InMemoryStore::new(100_000));
//! let telemetry = Telemetry::new(&recorder, store.kind(), None);
//! let store = InstrumentedStore::wrap(store, &telemetry);
//! let status = Status { metrics, telemetry: telemetry.clone(), store: store.clone() };
//! tokio::spawn(numstream_server::serve_status(
//!     tokio::net::TcpListener::bind("127.0.0.1:9100").await?,
//!     status,
//! ));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! numstream_server::run_with_telemetry(
//!     listener, store, numstream_server::ServerConfig::default(), shutdown, telemetry,
//! ).await?;
//! # Ok(()) }
//! ```

mod config;
mod connection;
mod digest;
mod door;
mod instrumented;
mod isolated;
mod overload;
mod peers;
mod registry;
mod renewals;
mod server;
mod socket;
mod status;
pub mod telemetry;
#[cfg(test)]
mod test_store;
#[cfg(feature = "testing")]
pub mod testing;
mod tls;

pub use config::{DEFAULT_BURST_SEND_BUFFER, ServerConfig};
pub use instrumented::InstrumentedStore;
pub use isolated::{IsolatedStore, IsolationError};
pub use overload::{DEFAULT_RUN_QUEUE, Overload, OverloadLimits, Overloaded};
pub use peers::{DEFAULT_SESSION_RATE, PeerKey, PeerLimits, SessionRate};
pub use server::{MAX_CONCURRENT_REJECTIONS, ServerError, run, run_with_telemetry};
pub use socket::{DEFAULT_LISTEN_BACKLOG, ListenOptions, listen};
pub use status::{
    MAX_STATUS_CONNECTIONS, READY_PING_TIMEOUT, SPARE_STATUS_CONNECTIONS,
    STATUS_CONNECTIONS_PER_ADDRESS, Status, prometheus_recorder, serve_status,
};
pub use telemetry::Telemetry;
pub use tls::{ALPN_NUMSTREAM, ServerTls, TlsError, TlsFiles};
