//! Server tuning knobs and their defaults, independent of how they are set
//! (CLI flags in the binary, struct literals in tests and benchmarks).

use std::sync::Arc;
use std::time::Duration;

use crate::overload::OverloadLimits;
use crate::peers::PeerLimits;
use crate::tls::ServerTls;

/// Send buffer asked for in burst mode (the kernel doubles it for its own
/// bookkeeping). Enough to keep a reading client's pipe full on a fast
/// link (1,024 numbers are 14 KiB), small enough that a client that stops
/// reading pins little kernel memory and soon blocks the write.
pub const DEFAULT_BURST_SEND_BUFFER: usize = 64 * 1024;

/// Everything `server::run` needs to know besides its listener and store.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Gap between consecutive numbers of one session; zero streams as fast
    /// as the connection drains.
    pub interval: Duration,
    /// How long a session survives a disconnection.
    pub session_ttl: Duration,
    /// Master seed for reproducible sessions (`--seed`); `None` seeds every
    /// session from the OS.
    pub seed: Option<u64>,
    /// Connections served at once; past it, new ones get `server_busy`.
    pub max_connections: usize,
    /// Time a new connection has to deliver a complete OPEN or RESUME.
    pub handshake_timeout: Duration,
    /// Time the client has to ACK after FINAL before the session is kept
    /// for a resume instead of being completed, counted from the client's
    /// receipt of FINAL (see [`ServerConfig::ack_wait`]).
    pub ack_timeout: Duration,
    /// Longest a single write may block on a client that does not read
    /// before the connection is declared dead.
    pub write_timeout: Duration,
    /// Bound on detecting a vanished peer (no FIN): TCP_USER_TIMEOUT, with
    /// keepalive probes so idle connections are covered too.
    pub dead_peer_timeout: Duration,
    /// How long a draining server waits for its connections to finish.
    pub shutdown_grace: Duration,
    /// What one source address (IPv4, or IPv6 /64) may take of this
    /// server: connections, handshake slots, sessions, new sessions a
    /// second (see `peers`).
    pub per_address: PeerLimits,
    /// Cap on each connection's kernel send buffer in burst mode
    /// (`interval` zero), where a client that does not read would
    /// otherwise let the kernel queue megabytes for it (send-buffer
    /// autotuning) before a write ever blocks and the write timeout can
    /// apply. `None` leaves the kernel's autotuning alone.
    pub burst_send_buffer: Option<usize>,
    /// How often the tallies of events a peer can cause at will (failed
    /// handshakes, refusals) are logged, one info line for all of them,
    /// instead of a line each.
    pub log_digest_every: Duration,
    /// Scheduling lag and store latency past which new sessions are
    /// refused (see `overload`).
    pub overload: OverloadLimits,
    /// TLS on the client port (`--tls-cert`, `--tls-key`): every
    /// connection must then speak TLS. `None` is plain TCP.
    pub tls: Option<Arc<ServerTls>>,
}

impl ServerConfig {
    /// Lease on an attached session: if this server dies without detaching,
    /// the session expires one TTL later, as if it had been detached.
    pub fn lease(&self) -> Duration {
        self.session_ttl
    }

    /// How long the server waits for ACK after writing FINAL. Writing puts
    /// FINAL in the kernel, not in the client's hands: behind a slow link
    /// it may arrive much later. The kernel either gets it acknowledged
    /// within `dead_peer_timeout` or fails the socket, so waiting that long
    /// on top of `ack_timeout` never detaches a session whose client is
    /// still receiving it.
    pub fn ack_wait(&self) -> Duration {
        self.ack_timeout.saturating_add(self.dead_peer_timeout)
    }

    /// How often an owner renews its lease: three chances before it lapses.
    pub fn lease_renewal_period(&self) -> Duration {
        (self.lease() / 3).max(Duration::from_millis(10))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            session_ttl: Duration::from_secs(30),
            seed: None,
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(120),
            write_timeout: Duration::from_secs(10),
            dead_peer_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            per_address: PeerLimits::derived(10_000, 100_000),
            burst_send_buffer: Some(DEFAULT_BURST_SEND_BUFFER),
            log_digest_every: Duration::from_secs(60),
            overload: OverloadLimits::default(),
            tls: None,
        }
    }
}
