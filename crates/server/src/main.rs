//! `numstream-server`: command-line front end for the server library.
//!
//! Parses flags, sets up logging and the session store, binds the listener
//! and turns SIGINT/SIGTERM into a graceful drain.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use numstream_server::ServerConfig;
use numstream_store::{InMemoryStore, SessionStore};
use numstream_store_redis::{DEFAULT_PREFIX, RedisStore, RedisStoreConfig};

/// Descriptors kept back from the connection limit for the listener, the
/// store's connections, logs and the busy-rejection path.
const RESERVED_FDS: u64 = 64;

/// Streams resumable, verifiable sequences of numbers to numstream clients.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  numstream-server --port 7000\n  numstream-server --port 7000 --interval 50ms --session-ttl 10s\n  numstream-server --port 7000 --seed 42   # reproducible sequences for tests\n  numstream-server --port 7001 --store redis://127.0.0.1:6379/0   # sessions shared by every instance on this Redis\n\nLogs go to stderr; RUST_LOG (e.g. RUST_LOG=debug) overrides the level."
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
    /// sessions past it get `server_busy`. In-memory store only: with
    /// Redis it does not apply (Redis's memory is the bound).
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

    /// Where sessions live: `memory` (in this process; they end with it) or
    /// `redis://[USER:PASSWORD@]HOST:PORT/DB` (shared by every instance
    /// pointed at the same Redis, so clients resume on any of them and a
    /// draining server sends them there). If Redis is down the server
    /// starts anyway and answers `store_unavailable` until it is back.
    #[arg(long, default_value = "memory", value_parser = parse_store)]
    store: StoreUrl,

    /// Prefix of every Redis key and of the takeover channel, so several
    /// deployments can share one Redis (with --store redis://...).
    #[arg(long, default_value = DEFAULT_PREFIX)]
    redis_prefix: String,
}

/// Where sessions live, as given by `--store`.
#[derive(Debug, Clone)]
enum StoreUrl {
    Memory,
    Redis(String),
}

fn parse_store(text: &str) -> Result<StoreUrl, String> {
    const EXPECTED: &str = "expected `memory` or `redis://HOST:PORT/DB`";
    if text == "memory" {
        return Ok(StoreUrl::Memory);
    }
    if !text.starts_with("redis://") {
        return Err(EXPECTED.to_owned());
    }
    // Parsing does no I/O; the URL itself never goes into messages, as it
    // may carry a password.
    RedisStore::connect_lazy(text, RedisStoreConfig::default()).map_err(|error| match error {
        numstream_store::StoreError::Unavailable(why) => format!("{why} ({EXPECTED})"),
        other => format!("{other} ({EXPECTED})"),
    })?;
    Ok(StoreUrl::Redis(text.to_owned()))
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
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    let max_sessions_given = matches.value_source("max_sessions") == Some(ValueSource::CommandLine);
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

    let store: Arc<dyn SessionStore> = match &args.store {
        StoreUrl::Memory => {
            let memory = Arc::new(InMemoryStore::new(max_sessions));
            // Frees memory of sessions whose TTL passed; expiry itself is
            // decided on access, so the period only bounds how long dead
            // entries linger. Runs as long as the runtime does.
            drop(memory.spawn_sweeper(Duration::from_secs(1).min(args.session_ttl)));
            memory
        }
        StoreUrl::Redis(url) => {
            if max_sessions_given {
                tracing::warn!("--max-sessions does not apply to a Redis store; ignoring it");
            }
            redis_store(url, &args.redis_prefix).await?
        }
    };

    let address = SocketAddr::new(args.bind, args.port);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    tracing::info!(
        store = store.kind(),
        interval = %humantime::format_duration(config.interval),
        session_ttl = %humantime::format_duration(config.session_ttl),
        // Only the in-memory store is bounded by --max-sessions.
        max_sessions = matches!(args.store, StoreUrl::Memory).then_some(max_sessions),
        max_connections,
        "numstream-server starting"
    );
    numstream_server::run(listener, store, config, shutdown).await?;
    Ok(())
}

/// A Redis store that connects on first use: a server started while Redis
/// is down serves `store_unavailable` (retryable) until Redis answers, then
/// recovers by itself, as it does after any later outage.
async fn redis_store(url: &str, prefix: &str) -> anyhow::Result<Arc<dyn SessionStore>> {
    let config = RedisStoreConfig {
        prefix: prefix.to_owned(),
        ..RedisStoreConfig::default()
    };
    let redis = RedisStore::connect_lazy(url, config).context("invalid --store URL")?;
    match redis.ping().await {
        Ok(()) => tracing::info!(prefix, "connected to Redis"),
        Err(error) => tracing::warn!(
            %error,
            "Redis is not answering; starting anyway and answering store_unavailable until it does"
        ),
    }
    Ok(Arc::new(redis))
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
