//! `numstream-server`: command-line front end for the server library.
//!
//! Parses flags, sets up logging and the session store, binds the listener
//! and turns SIGINT/SIGTERM into a graceful drain.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use numstream_server::ServerConfig;
use numstream_store::{InMemoryStore, SessionStore};

/// Descriptors kept back from the connection limit for the listener, the
/// store's connections, logs and the busy-rejection path.
const RESERVED_FDS: u64 = 64;

/// Streams resumable, verifiable sequences of numbers to numstream clients.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  numstream-server --port 7000\n  numstream-server --port 7000 --interval 50ms --session-ttl 10s\n  numstream-server --port 7000 --seed 42   # reproducible sequences for tests\n\nLogs go to stderr; RUST_LOG (e.g. RUST_LOG=debug) overrides the level."
)]
struct Args {
    /// TCP port to listen on (1-65535).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,

    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,

    /// Gap between numbers of one session, e.g. 1s, 50ms, 0s (0 = as fast
    /// as possible). At most 1h.
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    interval: Duration,

    /// How long a session survives a disconnection before it is forgotten
    /// and resumes are rejected, e.g. 30s, 2m.
    #[arg(long, default_value = "30s", value_parser = parse_ttl)]
    session_ttl: Duration,

    /// Master seed for reproducible runs: each session's sequence is then a
    /// function of this value and the client id. Omit to seed every session
    /// from the OS (the production setting).
    #[arg(long)]
    seed: Option<u64>,

    /// Most sessions held at once (attached or awaiting a resume); new
    /// sessions past it get `server_busy`.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_sessions: u64,

    /// Most connections served at once; past it, new connections get
    /// `server_busy`. Default: the open-file limit minus a reserve.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,

    /// Time a new connection has to send its OPEN or RESUME.
    #[arg(long, default_value = "5s", value_parser = parse_positive)]
    handshake_timeout: Duration,

    /// Time the client has to acknowledge FINAL before its session is kept
    /// for a resume instead of completed.
    #[arg(long, default_value = "5s", value_parser = parse_positive)]
    ack_timeout: Duration,

    /// On SIGINT/SIGTERM, how long to wait for connections to drain.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval =
        humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 1s, 50ms, 0s)"))?;
    if interval > Duration::from_secs(3600) {
        return Err("interval must be at most 1h".into());
    }
    Ok(interval)
}

fn parse_positive(text: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 5s, 500ms)"))?;
    if duration.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(duration)
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_positive(text)?;
    // The protocol carries the TTL in milliseconds in a u32.
    if ttl > Duration::from_millis(u64::from(u32::MAX)) {
        return Err("session TTL must be at most 49 days".into());
    }
    if ttl < Duration::from_millis(100) {
        return Err("session TTL must be at least 100ms".into());
    }
    Ok(ttl)
}

fn default_max_connections() -> u64 {
    match rlimit::Resource::NOFILE.get() {
        Ok((soft, _hard)) => soft.saturating_sub(RESERVED_FDS).max(1),
        Err(_) => 1024,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let max_sessions = usize::try_from(args.max_sessions).unwrap_or(usize::MAX);
    let max_connections = args.max_connections.unwrap_or_else(default_max_connections);
    let config = ServerConfig {
        interval: args.interval,
        session_ttl: args.session_ttl,
        seed: args.seed,
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        handshake_timeout: args.handshake_timeout,
        ack_timeout: args.ack_timeout,
        shutdown_grace: args.shutdown_grace,
        ..ServerConfig::default()
    };

    let memory = Arc::new(InMemoryStore::new(max_sessions));
    // Frees memory of sessions whose TTL passed; expiry itself is decided
    // on access, so the period only bounds how long dead entries linger.
    let _sweeper = memory.spawn_sweeper(Duration::from_secs(1).min(args.session_ttl));
    let store: Arc<dyn SessionStore> = memory;

    let address = SocketAddr::new(args.bind, args.port);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    tracing::info!(
        interval = %humantime::format_duration(config.interval),
        session_ttl = %humantime::format_duration(config.session_ttl),
        max_sessions,
        max_connections,
        "numstream-server starting"
    );
    numstream_server::run(listener, store, config, shutdown).await?;
    Ok(())
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                    _ = terminate.recv() => tracing::info!("SIGTERM received"),
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    shutdown.cancel();
}
