//! `numstream-server`: command-line front end for the server library.
//!
//! Parses flags, sets up logging and the session store, binds the listener
//! and turns SIGINT/SIGTERM into a graceful drain.

mod store_url;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use numstream_cli_support::values::{duration_in, integer_in};
use numstream_server::{
    InstrumentedStore, IsolatedStore, OverloadLimits, PeerLimits, ServerConfig, ServerTls,
    SessionRate, Status, Telemetry, TlsFiles,
};
use numstream_store::{InMemoryStore, SessionStore};
use numstream_store_redis::{DEFAULT_PREFIX, RedisStore, RedisStoreConfig};

use crate::store_url::{STORE_ENV, StoreUrl};

/// Descriptors kept back from the connection limit: the listener, the
/// store's connections, logs and the runtime's own (64), every connection
/// being told `server_busy` at once, and every status-endpoint connection.
/// With less, a server at its limit would run out of descriptors and fail
/// `accept` (EMFILE) instead of refusing politely.
const RESERVED_FDS: u64 = 64
    + numstream_server::MAX_CONCURRENT_REJECTIONS as u64
    + numstream_server::MAX_STATUS_CONNECTIONS as u64
    + numstream_server::SPARE_STATUS_CONNECTIONS as u64;

const EXAMPLES: &str = "\
Examples:
  numstream-server --port 7000
  numstream-server --port 7000 --interval 50ms --session-ttl 10s
  numstream-server --port 7000 --seed 42   # reproducible sequences for tests
  numstream-server --port 7001 --store redis://127.0.0.1:6379/0   # sessions shared by every instance on this Redis
  NUMSTREAM_STORE=rediss://:PASSWORD@redis.internal:6380/0 numstream-server --port 7001   # password kept out of argv
  numstream-server --port 7000 --tls-cert server.pem --tls-key server.key   # TLS; SIGHUP reloads both
  numstream-server --port 7000 --metrics-addr 127.0.0.1:9100 --log-format json

Status endpoint (with --metrics-addr): GET /metrics (Prometheus text), /healthz
(200 while running), /readyz (200 when accepting and the store answers, else 503).

Logs go to stderr; RUST_LOG (e.g. RUST_LOG=debug) overrides the level (info).";

/// Streams resumable, verifiable sequences of numbers to numstream clients.
///
/// Every flag below shows its default; durations take units (500ms, 5s, 2m).
#[derive(Debug, Parser)]
#[command(version, after_help = EXAMPLES)]
struct Args {
    /// TCP port to listen on for clients, 0-65535 (required); 0 lets the
    /// kernel pick a free one
    ///
    /// The bound address is printed on stdout as `listening on ADDR:PORT`
    /// (and written to --ready-file), so whoever starts the server with
    /// port 0 learns the port without racing for it.
    ///
    /// Example: --port 7000
    #[arg(long, allow_hyphen_values = true, value_parser = integer_in(0u16, u16::MAX))]
    port: u16,

    /// Once the server accepts connections, write its addresses to this
    /// file [default: none]
    ///
    /// One per line: `address=ADDR:PORT`, and `status_address=ADDR:PORT`
    /// with --metrics-addr. The file appears whole (written beside it, then
    /// renamed), so a launcher may wait for it to exist and read it once;
    /// with --port 0 it learns the port without racing for it.
    ///
    /// Example: --ready-file /tmp/numstream.ready
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,

    /// Address to bind for clients
    ///
    /// 0.0.0.0 (or ::) listens on every interface.
    ///
    /// Example: --bind 0.0.0.0
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    bind: IpAddr,

    /// Gap between numbers of one session, 0s to 1h
    ///
    /// 0s streams as fast as the connection drains.
    ///
    /// Example: --interval 50ms
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true, default_value = "1s", value_parser = duration_in(Duration::ZERO, HOUR, "0s and 1h"))]
    interval: Duration,

    /// How long a disconnected session waits for a resume, 100ms to 49 days
    ///
    /// After it the session is forgotten and resumes are rejected
    /// (session_expired / session_unknown). Also the lease on an attached
    /// session: a server that dies without detaching lets it lapse.
    ///
    /// Example: --session-ttl 2m
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true, default_value = "30s", value_parser = duration_in(MIN_TTL, MAX_TTL, "100ms and 49 days"))]
    session_ttl: Duration,

    /// Master seed for reproducible runs [default: none, every session is
    /// seeded from the OS]
    ///
    /// Each session's sequence is then a function of this value and the
    /// client id: a testing aid, not for production.
    ///
    /// Example: --seed 42
    #[arg(long, value_name = "U64", allow_hyphen_values = true, value_parser = integer_in(0, u64::MAX))]
    seed: Option<u64>,

    /// Most sessions held at once (attached or awaiting a resume)
    ///
    /// 1 to 1000000000. New sessions past it get server_busy. With Redis it
    /// bounds the whole deployment (every instance sharing the
    /// --redis-prefix), not each instance: give them all the same value.
    ///
    /// Example: --max-sessions 500000
    #[arg(long, value_name = "N", default_value_t = 100_000, allow_hyphen_values = true, value_parser = integer_in(1, MAX_SESSIONS_CAP))]
    max_sessions: u64,

    /// Most client connections served at once [default: the open-file limit
    /// minus 384]
    ///
    /// 1 to 10000000. New connections past it get server_busy. The default keeps
    /// descriptors for the listener, the store, 256 busy rejections in
    /// flight and 64 status connections, so the server never runs out.
    ///
    /// Example: --max-connections 20000
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = integer_in(1, MAX_CONNECTIONS_CAP))]
    max_connections: Option<u64>,

    /// Connections one address may hold [default: max-connections/10, >= 64]
    ///
    /// 0 (no limit) to 10000000. An address is an IPv4 address or an IPv6 /64. Past it that address
    /// gets server_busy while every other address is still served. Raise
    /// it (or 0) when many clients share one address: behind NAT, or when
    /// a proxy or load balancer connects on their behalf.
    ///
    /// Example: --per-address-connections 5000
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = integer_in(0, MAX_CONNECTIONS_CAP as u32))]
    per_address_connections: Option<u32>,

    /// Handshakes one address may have open [default: its connections/4, >= 16]
    ///
    /// Connections that have not yet sent OPEN or RESUME, 0 (no limit) to
    /// 10000000; the default is a quarter of
    /// --per-address-connections, at least 16. Bounds slowloris: connections that say nothing cost an attacker
    /// nothing but hold a slot for --handshake-timeout.
    ///
    /// Example: --per-address-handshakes 100
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = integer_in(0, MAX_CONNECTIONS_CAP as u32))]
    per_address_handshakes: Option<u32>,

    /// Sessions one address may hold [default: max-sessions/10, >= 64]
    ///
    /// Streaming or awaiting a resume, 0 (no limit) to 1000000000; the
    /// default is a tenth of --max-sessions, at least 64. A session counts against the address that opened it until it
    /// completes or, once disconnected, for the session TTL (plus up to
    /// 1s). Counted by each instance for the sessions opened on it.
    ///
    /// Example: --per-address-sessions 20000
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = integer_in(0, MAX_SESSIONS_CAP as u32))]
    per_address_sessions: Option<u32>,

    /// New sessions (OPENs) one address may start per second
    ///
    /// 0 (no limit) to 1000000, sustained. A token bucket: an address that has been quiet may start
    /// --per-address-session-burst at once. Past it, OPENs get
    /// server_busy (resumes are never rate-limited).
    ///
    /// Example: --per-address-session-rate 500
    #[arg(long, value_name = "N", default_value_t = numstream_server::DEFAULT_SESSION_RATE.per_second, allow_hyphen_values = true, value_parser = integer_in(0u32, 1_000_000))]
    per_address_session_rate: u32,

    /// New sessions one address may start at once after a quiet spell
    ///
    /// 1 to 1000000.
    ///
    /// Example: --per-address-session-burst 1000
    #[arg(long, value_name = "N", default_value_t = numstream_server::DEFAULT_SESSION_RATE.burst, allow_hyphen_values = true, value_parser = integer_in(1u32, 1_000_000))]
    per_address_session_burst: u32,

    /// Scheduling lag to stay under; past it, stop admitting [0s: off]
    ///
    /// 0s to 1h. How much later than asked the runtime runs a timer's task
    /// (smoothed). Past it the server caps the sessions it streams at 90%
    /// of those streaming then and refuses new sessions (OPEN) beyond the
    /// cap with server_busy, growing the cap again by 2% a second once the
    /// lag is back under; past five times it, a share of all new sessions
    /// is refused too. Resumes are always served. Reported in /metrics and
    /// /readyz.
    ///
    /// Example: --overload-lag 250ms
    #[arg(long, value_name = "DURATION", default_value = "500ms", allow_hyphen_values = true, value_parser = duration_in(Duration::ZERO, HOUR, "0s and 1h"))]
    overload_lag: Duration,

    /// Refuse new sessions while the store answers this slowly [0s: never]
    ///
    /// 0s to 1h. The shared store's round trip (smoothed over about ten
    /// operations, measured on the store's own thread, so a busy server
    /// does not inflate it) past which new sessions get server_busy, in the
    /// same proportion. Redis store only.
    ///
    /// Example: --overload-store 250ms
    #[arg(long, value_name = "DURATION", default_value = "500ms", allow_hyphen_values = true, value_parser = duration_in(Duration::ZERO, HOUR, "0s and 1h"))]
    overload_store: Duration,

    /// Stop accepting connections while more tasks than this wait in the
    /// runtime's shared run queue [0: never]
    ///
    /// 0 to 10000000. A healthy server has a handful there; past it, the
    /// server has more work than CPU and whatever waits there (a new
    /// connection's task among it) waits seconds. New connections then
    /// wait in the listen backlog, at no cost, until the queue drains.
    /// Reported in /metrics (numstream_run_queue_depth) and /readyz.
    ///
    /// Example: --overload-queue 10000
    #[arg(long, value_name = "TASKS", default_value_t = numstream_server::DEFAULT_RUN_QUEUE, allow_hyphen_values = true, value_parser = integer_in(0u32, 10_000_000))]
    overload_queue: u32,

    /// Time a new connection has to send its OPEN or RESUME
    ///
    /// At most 1h.
    ///
    /// Example: --handshake-timeout 2s
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true, default_value = "5s", value_parser = duration_in(MILLISECOND, HOUR, "1ms and 1h"))]
    handshake_timeout: Duration,

    /// Time the client has to acknowledge FINAL
    ///
    /// At most 24h. Past it the session is kept for a resume instead of completed. This
    /// is not how a dead client is found (keepalive and TCP_USER_TIMEOUT do
    /// that, and a client that closes is detached at once): it only bounds a
    /// client that stays connected without acknowledging, and it must cover
    /// FINAL's trip over a slow link, hence the generous default.
    ///
    /// Example: --ack-timeout 30s
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true, default_value = "2m", value_parser = duration_in(MILLISECOND, DAY, "1ms and 24h"))]
    ack_timeout: Duration,

    /// On SIGINT/SIGTERM, how long to wait for connections to drain
    ///
    /// 0s to 1h.
    ///
    /// Example: --shutdown-grace 10s
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true, default_value = "5s", value_parser = duration_in(Duration::ZERO, HOUR, "0s and 1h"))]
    shutdown_grace: Duration,

    /// Where sessions live: memory, redis://[USER:PASSWORD@]HOST:PORT/DB,
    /// rediss://... (over TLS) or redis-cluster://HOST:PORT[,HOST:PORT…]
    /// [default: $NUMSTREAM_STORE, else memory]
    ///
    /// memory keeps them in this process (they end with it). A Redis URL
    /// shares them with every instance pointed at the same Redis, so
    /// clients resume on any of them and a draining server sends them
    /// there. A redis-cluster URL lists seed nodes of a Redis Cluster (7
    /// or later); sessions spread over its masters. If Redis is down the
    /// server starts anyway and answers store_unavailable until it is
    /// back. A URL with a password is seen
    /// by every local user in the command line: give it in
    /// NUMSTREAM_STORE or --store-file instead. rediss:// verifies the
    /// Redis server against the system's trusted roots (SSL_CERT_FILE
    /// names another bundle).
    ///
    /// Example: --store redis://127.0.0.1:6379/0
    /// Example: --store redis-cluster://10.0.0.1:7000,10.0.0.2:7000
    #[arg(long, value_name = "URL", value_parser = secret_text, conflicts_with = "store_file")]
    store: Option<SecretText>,

    /// Read the --store URL from this file (one line), keeping a password
    /// out of the command line [default: none]
    ///
    /// Example: --store-file /run/secrets/numstream-store
    #[arg(long, value_name = "PATH")]
    store_file: Option<PathBuf>,

    /// Serve clients over TLS with this PEM certificate chain (own
    /// certificate first) [default: plain TCP]
    ///
    /// Requires --tls-key. Every client must then use TLS (ALPN
    /// numstream/1, TLS 1.3); a plaintext client is told so and fails at
    /// once. SIGHUP reloads the certificate, key and client CA from their
    /// files without dropping a connection.
    ///
    /// Example: --tls-cert /etc/numstream/server.pem
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1) [default:
    /// none]
    ///
    /// Example: --tls-key /etc/numstream/server.key
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Require client certificates chaining to these PEM CA certificates
    /// (mutual TLS) [default: no client certificates]
    ///
    /// Example: --tls-client-ca /etc/numstream/clients-ca.pem
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,

    /// Prefix of every Redis key and of the takeover channel
    ///
    /// At most 256 bytes. Lets several deployments share one Redis (with
    /// --store redis://...), each bounded by its own --max-sessions.
    ///
    /// Example: --redis-prefix staging:numstream:
    #[arg(long, value_name = "PREFIX", default_value = DEFAULT_PREFIX, value_parser = parse_prefix)]
    redis_prefix: String,

    /// Serve /metrics, /healthz and /readyz over HTTP on this address
    /// [default: off]
    ///
    /// /metrics is Prometheus text format (numstream_* metrics, see
    /// docs/operations.md); /healthz answers 200 while the process runs;
    /// /readyz answers 200 while the server accepts connections and the
    /// session store answers within 1s, else 503 with the reason. Keep it
    /// on a private interface: it is unauthenticated.
    ///
    /// Example: --metrics-addr 127.0.0.1:9100
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_metrics_addr)]
    metrics_addr: Option<SocketAddr>,

    /// Set SO_REUSEPORT on the client listener, so several server
    /// processes can listen on the same --port and the kernel spreads new
    /// connections over them
    ///
    /// Each process is a separate server: give them one shared
    /// --store redis://... so that a client that reconnects to another
    /// process can resume there. With the in-memory store a resume that
    /// lands on another process is refused (session_unknown).
    ///
    /// Example: --reuse-port --store redis://127.0.0.1:6379/0
    #[arg(long)]
    reuse_port: bool,

    /// Length of the queue of connections not yet accepted (the kernel caps
    /// it at net.core.somaxconn)
    ///
    /// Example: --listen-backlog 8192
    #[arg(long, value_name = "N", default_value_t = numstream_server::DEFAULT_LISTEN_BACKLOG, allow_hyphen_values = true, value_parser = integer_in(1u32, 65535))]
    listen_backlog: u32,

    /// Log line format on stderr: text (colours only on a terminal, and
    /// not with NO_COLOR) or json (one object per line)
    ///
    /// Every line about a connection carries its peer, and its session's
    /// client_id and generation once known (in json, as fields of the
    /// line); resume tokens are never logged.
    ///
    /// Example: --log-format json
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    log_format: LogFormat,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// A flag's value that may hold a secret: taken by clap as it is (a value
/// parser that cannot fail, so clap never quotes it in an error), parsed by
/// our own code afterwards, and never shown by `Debug`.
#[derive(Clone)]
struct SecretText(String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretText(<redacted>)")
    }
}

fn secret_text(text: &str) -> Result<SecretText, std::convert::Infallible> {
    Ok(SecretText(text.to_owned()))
}

fn parse_metrics_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        "expected an IP address and port, e.g. 127.0.0.1:9100, [::1]:9100 or 0.0.0.0:9100 \
         (port 0 picks a free one)"
            .to_owned()
    })
}

fn parse_prefix(text: &str) -> Result<String, String> {
    if text.len() > 256 {
        return Err(format!("must be at most 256 bytes, got {}", text.len()));
    }
    Ok(text.to_owned())
}

/// Upper bounds of `--max-connections` and `--max-sessions`: far beyond
/// what one process can serve, well inside what the code can count.
const MAX_CONNECTIONS_CAP: u64 = 10_000_000;
const MAX_SESSIONS_CAP: u64 = 1_000_000_000;

const MILLISECOND: Duration = Duration::from_millis(1);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
/// The session TTL's bounds: long enough to reconnect at all, and what
/// WELCOME can carry (milliseconds in a u32).
const MIN_TTL: Duration = Duration::from_millis(100);
const MAX_TTL: Duration = Duration::from_millis(u32::MAX as u64);

fn default_max_connections() -> u64 {
    match rlimit::Resource::NOFILE.get() {
        Ok((soft, _hard)) => soft
            .saturating_sub(RESERVED_FDS)
            .clamp(1, MAX_CONNECTIONS_CAP),
        Err(_) => 1024,
    }
}

/// The per-address limits: each flag given, or its share of the global
/// caps; 0 turns a limit off.
fn per_address_limits(args: &Args, max_connections: usize, max_sessions: usize) -> PeerLimits {
    let derived = PeerLimits::derived(max_connections, max_sessions);
    let given = |flag: Option<u32>, default: Option<u32>| match flag {
        Some(0) => None,
        Some(limit) => Some(limit),
        None => default,
    };
    let connections = given(args.per_address_connections, derived.connections);
    // The handshake default follows the connection quota actually in force.
    let handshake_default = match args.per_address_connections {
        Some(_) => PeerLimits::handshakes_for(connections.map_or(max_connections, |c| c as usize)),
        None => derived.handshakes,
    };
    PeerLimits {
        connections,
        handshakes: given(args.per_address_handshakes, handshake_default),
        sessions: given(args.per_address_sessions, derived.sessions),
        new_sessions: (args.per_address_session_rate > 0).then_some(SessionRate {
            per_second: args.per_address_session_rate,
            burst: args.per_address_session_burst,
        }),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let matches = numstream_cli_support::with_generate(Args::command()).get_matches();
    numstream_cli_support::generate_if_asked(&matches, Args::command());
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    // Our own parse, after clap's: its errors never repeat the URL.
    let store_url = store_url::resolve(
        args.store.as_ref().map(|text| text.0.as_str()),
        args.store_file.as_deref(),
        std::env::var_os(STORE_ENV),
    )
    .unwrap_or_else(|error| {
        Args::command()
            .error(clap::error::ErrorKind::ValueValidation, error)
            .exit()
    });
    init_logging(args.log_format);
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(
            ServerTls::load(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            })
            .unwrap_or_else(|error| {
                Args::command()
                    .error(
                        clap::error::ErrorKind::ValueValidation,
                        format!(
                            "cannot set up TLS (--tls-cert, --tls-key, --tls-client-ca): {error}"
                        ),
                    )
                    .exit()
            }),
        )),
        _ => None,
    };

    let max_sessions = usize::try_from(args.max_sessions).unwrap_or(usize::MAX);
    let max_connections = args.max_connections.unwrap_or_else(default_max_connections);
    let max_connections = usize::try_from(max_connections).unwrap_or(usize::MAX);
    let per_address = per_address_limits(&args, max_connections, max_sessions);
    let config = ServerConfig {
        interval: args.interval,
        session_ttl: args.session_ttl,
        seed: args.seed,
        per_address,
        overload: OverloadLimits {
            scheduling_lag: (!args.overload_lag.is_zero()).then_some(args.overload_lag),
            store_latency: (!args.overload_store.is_zero()).then_some(args.overload_store),
            run_queue: (args.overload_queue > 0).then_some(args.overload_queue as usize),
            ..OverloadLimits::default()
        },
        max_connections,
        handshake_timeout: args.handshake_timeout,
        ack_timeout: args.ack_timeout,
        shutdown_grace: args.shutdown_grace,
        tls: tls.clone(),
        ..ServerConfig::default()
    };

    // Bound before anything else starts, so a taken port fails fast.
    let status_listener = match args.metrics_addr {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address} (--metrics-addr)"))?,
        ),
        None => None,
    };
    // Created first: the metrics count its sessions at every scrape.
    let memory =
        matches!(store_url, StoreUrl::Memory).then(|| Arc::new(InMemoryStore::new(max_sessions)));
    let (telemetry, metrics) = match status_listener {
        Some(_) => {
            let recorder = numstream_server::prometheus_recorder();
            let metrics = recorder.handle();
            let session_count = memory.clone().map(|memory| {
                Box::new(move || memory.len()) as numstream_server::telemetry::SessionCounter
            });
            let telemetry = Telemetry::new(&recorder, store_url.kind(), session_count);
            // Also the process-wide recorder, for any library that reports
            // through the `metrics` macros.
            let _ = metrics::set_global_recorder(recorder);
            (telemetry, Some(metrics))
        }
        None => (Telemetry::disabled(), None),
    };

    let store: Arc<dyn SessionStore> = match (&store_url, memory) {
        (StoreUrl::Memory, Some(memory)) => {
            // Frees memory of sessions whose TTL passed; expiry itself is
            // decided on access, so the period only bounds how long dead
            // entries linger. Runs as long as the runtime does.
            let expired = telemetry.clone();
            drop(
                memory.spawn_sweeper(Duration::from_secs(1).min(args.session_ttl), move |swept| {
                    expired.sessions_expired(swept as u64)
                }),
            );
            memory
        }
        (StoreUrl::Redis(_), _) => {
            redis_store(&store_url, &args.redis_prefix, max_sessions).await?
        }
        (StoreUrl::Memory, None) => unreachable!("the in-memory store was created above"),
    };
    let store = InstrumentedStore::wrap(store, &telemetry);

    let address = SocketAddr::new(args.bind, args.port);
    let listen_options = numstream_server::ListenOptions {
        reuse_port: args.reuse_port,
        backlog: args.listen_backlog,
    };
    let listener = numstream_server::listen(address, listen_options).with_context(|| {
        if args.reuse_port {
            format!("cannot listen on {address} (with --reuse-port)")
        } else {
            format!(
                "cannot listen on {address} (another process may hold the port; several \
                 servers share one port only if each is started with --reuse-port)"
            )
        }
    })?;
    if args.reuse_port && matches!(store_url, StoreUrl::Memory) {
        tracing::warn!(
            "--reuse-port with the in-memory store: a client that reconnects may reach \
             another process, which does not know its session; share a --store redis://... \
             between the processes to make resumes work across them"
        );
    }

    let bound = listener
        .local_addr()
        .context("the client listener has no address")?;
    let mut ready = format!("address={bound}\n");
    if let (Some(status_listener), Some(metrics)) = (status_listener, metrics) {
        let status = Status {
            metrics,
            telemetry: telemetry.clone(),
            store: store.clone(),
        };
        if let Ok(status_address) = status_listener.local_addr() {
            tracing::info!(
                %status_address,
                "status endpoint listening: /metrics, /healthz, /readyz"
            );
            ready.push_str(&format!("status_address={status_address}\n"));
        }
        // Serves until the process exits, so /readyz says "draining" (503)
        // while connections drain.
        tokio::spawn(numstream_server::serve_status(status_listener, status));
    }

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    if let Some(tls) = tls {
        tokio::spawn(reload_on_hangup(tls));
    }
    tracing::info!(
        store = %store_url,
        tls = config.tls.is_some(),
        mutual_tls = args.tls_client_ca.is_some(),
        interval = %humantime::format_duration(config.interval),
        session_ttl = %humantime::format_duration(config.session_ttl),
        max_sessions,
        max_connections,
        per_address = %describe(per_address),
        reuse_port = args.reuse_port,
        "numstream-server starting"
    );
    announce(bound, &ready, args.ready_file.as_deref())?;
    numstream_server::run_with_telemetry(listener, store, config, shutdown, telemetry).await?;
    Ok(())
}

/// Tells whoever started the server where it listens: a line on stdout, and
/// the ready file when asked for. Connections are already queued by the
/// kernel from here on (the listener is bound and listening).
fn announce(
    bound: SocketAddr,
    ready: &str,
    ready_file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use std::io::Write;
    // The file first: a launcher that reads the stdout line may then read
    // the file too (CI caught a test reading it between the two).
    if let Some(path) = ready_file {
        numstream_cli_support::write_ready_file(path, ready)
            .with_context(|| format!("cannot write --ready-file {}", path.display()))?;
    }
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (a launcher that does not read it) is not an error.
    let _ = writeln!(stdout, "listening on {bound}").and_then(|()| stdout.flush());
    Ok(())
}

/// The per-address limits as the startup line shows them.
fn describe(limits: PeerLimits) -> String {
    let limit = |value: Option<u32>| value.map_or("unlimited".to_owned(), |v| v.to_string());
    let rate = limits.new_sessions.map_or("unlimited".to_owned(), |rate| {
        format!("{}/s (burst {})", rate.per_second, rate.burst)
    });
    format!(
        "connections {}, handshakes {}, sessions {}, new sessions {rate}",
        limit(limits.connections),
        limit(limits.handshakes),
        limit(limits.sessions),
    )
}

/// Logs to stderr as text (coloured only on a terminal without NO_COLOR)
/// or JSON lines; RUST_LOG overrides the default level, info.
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs
            .with_ansi(numstream_cli_support::stderr_wants_colour())
            .init(),
        // The event's fields (peer, client_id, generation and its own)
        // sit at the top level; the server makes no spans.
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// A Redis store that connects on first use: a server started while Redis
/// is down serves `store_unavailable` (retryable) until Redis answers, then
/// recovers by itself, as it does after any later outage.
async fn redis_store(
    url: &StoreUrl,
    prefix: &str,
    max_sessions: usize,
) -> anyhow::Result<Arc<dyn SessionStore>> {
    let config = RedisStoreConfig {
        prefix: prefix.to_owned(),
        max_sessions,
        ..RedisStoreConfig::default()
    };
    let redis = RedisStore::connect_lazy(url.expose(), config)
        .map_err(|error| anyhow::anyhow!("cannot use the store {url}: {error}"))?;
    // All Redis I/O on a thread of its own, made before the first
    // operation so that the connection is made there (see IsolatedStore).
    let redis = IsolatedStore::wrap(Arc::new(redis)).context("cannot start the store's thread")?;
    match redis.ping().await {
        Ok(()) => tracing::info!(prefix, "connected to Redis"),
        Err(error) => tracing::warn!(
            %error,
            "Redis is not answering; starting anyway and answering store_unavailable until it does"
        ),
    }
    Ok(redis)
}

/// On every SIGHUP, reads the TLS certificate, key and client CA again;
/// new handshakes use them, established connections keep streaming. A
/// failed reload keeps the previous certificate in force.
async fn reload_on_hangup(tls: Arc<ServerTls>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGHUP; the TLS certificate is not reloadable");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            let cert = tls.files().cert.display().to_string();
            match tls.reload() {
                Ok(()) => tracing::info!(%cert, "SIGHUP: TLS certificate and key reloaded"),
                Err(error) => tracing::error!(
                    %error,
                    "SIGHUP: TLS reload failed; still serving the previous certificate"
                ),
            }
        }
    }
    #[cfg(not(unix))]
    drop(tls);
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
