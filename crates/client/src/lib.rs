//! numstream client library: fetches one session's numbers from a numstream
//! server, survives dropped connections by resuming, and reports whether the
//! sequence verified.
//!
//! The protocol rules (what to send first, which frames are acceptable) live
//! in [`numstream_protocol::SequenceReceiver`]; this crate owns everything
//! around it that needs a clock or a socket: connecting, timeouts, the
//! reconnect policy ([`Backoff`], port rotation, give-up bounds) and the
//! final [`Report`]. The `numstream-client` binary is a thin CLI over
//! [`run`]; the server's end-to-end tests and load generators call [`run`]
//! in-process. [`run_with`] is the same over any [`Connector`] (the real
//! one is [`TcpConnector`]: TCP, TLS when configured), so tests can run the
//! client over in-memory streams under paused time.
//!
//! ```no_run
//! # async fn demo() {
//! use numstream_client::{ClientConfig, run};
//! let config = ClientConfig {
//!     ports: vec![7000],
//!     count: 20,
//!     ..ClientConfig::default()
//! };
//! let report = run(config, &mut ()).await;
//! assert!(report.ok, "{}", report.render_human());
//! # }
//! ```

mod backoff;
mod config;
mod error;
mod event;
mod report;
mod retry;
mod session;
mod transport;
mod untrusted;

pub use backoff::Backoff;
pub use config::ClientConfig;
pub use error::ClientError;
pub use event::{Event, NoopObserver, Observer};
pub use report::Report;
pub use session::{run, run_with};
pub use transport::{
    ALPN_NUMSTREAM, ClientStream, ClientTls, Connector, HandshakeFailure, TcpConnector, TlsOptions,
    TlsSetupError,
};
pub use untrusted::{MAX_TRUSTED_INTERVAL, MAX_TRUSTED_TTL, MIN_TRUSTED_TTL, escape};

/// Process exit code: the sequence was received completely and the
/// checksums matched.
pub const EXIT_OK: u8 = 0;
/// Process exit code: the sequence was received but the server's checksum
/// differs from the one computed over the numbers received.
pub const EXIT_CHECKSUM_MISMATCH: u8 = 1;
/// Process exit code: invalid command line or configuration (clap uses 2
/// for usage errors, so the library's own config checks use it too).
pub const EXIT_USAGE: u8 = 2;
/// Process exit code: the server refused the session or ended it for good
/// (any `Final` server error: expired, unknown, taken over, shut down, ...).
pub const EXIT_REJECTED: u8 = 3;
/// Process exit code: no server could be reached, or the session could not
/// be resumed before its TTL ran out.
pub const EXIT_CANNOT_CONNECT: u8 = 4;
/// Process exit code: the server broke the protocol (undecodable bytes, a
/// wrong, duplicate or missing index, a mismatched WELCOME, ...).
pub const EXIT_PROTOCOL_VIOLATION: u8 = 5;
/// Process exit code: TLS could not be established and retrying would not
/// help: no TLS (or no numstream/1) on the server's port, an untrusted,
/// expired or misnamed server certificate, or our client certificate
/// refused.
pub const EXIT_TLS: u8 = 6;
