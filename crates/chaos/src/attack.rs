//! The abusive client of the chaos run: an attacker that runs beside the
//! honest clients, against every server instance, from source addresses of
//! its own (127.66.0.0/24), so a server can tell it from the honest clients
//! (who come from 127.1.0.0/16, see `run::honest_source`).
//!
//! Its behaviours ([`AttackKind`]):
//!
//! - **hog**: as many connections as the server lets it have, each with a
//!   valid OPEN of 65,535 numbers, never reading past the WELCOME; a slot the
//!   server closes or refuses is opened again.
//! - **churn**: connect, OPEN, read the WELCOME, reset; in a loop from a few
//!   tasks per server, each paced to a rate, filling the session table with
//!   sessions that wait out their TTL.
//! - **slowloris**: connections that send nothing or a part of an OPEN and
//!   hold a handshake slot until the server closes them, then open again.
//!
//! Everything it does is planned from the seed ([`AttackPlan`]: its tasks,
//! their source addresses, every client id and every partial hello), and it
//! is bounded in count (a connection budget over all servers, sized from the
//! open-file limit by the run) and in time ([`Attacker::stop`] ends it with
//! the run). Its own outcomes are not judged; [`AttackReport`] says what it
//! achieved.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use chacha20::ChaCha8Rng;
use rand::RngExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{MissedTickBehavior, timeout};
use tokio_util::sync::CancellationToken;

use numstream_protocol::codec::LENGTH_PREFIX_LEN;
use numstream_protocol::{
    ClientId, ErrorCode, Frame, MAX_PAYLOAD_LEN, Open, decode_frame, encode_frame,
};

use crate::plan::{OPEN_LEN, seeded_rng};
use crate::proxy::socket_from;

/// First three octets of the attacker's source addresses.
pub const ATTACKER_NETWORK: [u8; 3] = [127, 66, 0];
/// Bound on one connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a connect failed (a server down for a restart).
const CONNECT_RETRY: Duration = Duration::from_millis(250);
/// How long churn waits for its WELCOME (or refusal).
const CHURN_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a hog checks, without reading, whether the server closed one
/// of its connections.
const HOG_CHECK_EVERY: Duration = Duration::from_millis(500);
/// The hog's receive buffer: the kernel's minimum (it rounds up), so that
/// the server's writes to a hog connection block after a hundred or two
/// numbers, like those to any client that stops reading. With the kernel's
/// default (which grows to hold a whole session on loopback) every hog
/// session would stream at full speed for minutes, and a thousand of them
/// take more CPU than a 2-core machine running debug builds has (each
/// number costs a ChaCha20 block there): the honest clients would suffer
/// from the load, which is not what a per-address limit is about.
const HOG_RECEIVE_BUFFER: u32 = 1;
/// Keepalive on hog connections. A server that gives up on a blocked
/// connection (write timeout, `TCP_USER_TIMEOUT`) closes it with numbers
/// unsent: its FIN, if any, is stuck behind them, and the hog would count
/// the connection as held forever. A keepalive probe to a connection the
/// server's kernel no longer has is answered with a reset, which the hog
/// sees without reading.
const HOG_KEEPALIVE: Duration = Duration::from_secs(2);

/// The `k`-th source address of the attacker: 127.66.0.1, 127.66.0.2, ...
pub fn attacker_source(k: usize) -> Ipv4Addr {
    let [a, b, c] = ATTACKER_NETWORK;
    Ipv4Addr::new(a, b, c, (1 + k % 254) as u8)
}

/// What the attacker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttackKind {
    Hog,
    Churn,
    Slowloris,
}

impl AttackKind {
    pub const ALL: [AttackKind; 3] = [Self::Hog, Self::Churn, Self::Slowloris];

    pub fn name(self) -> &'static str {
        match self {
            Self::Hog => "hog",
            Self::Churn => "churn",
            Self::Slowloris => "slowloris",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// An `--attack` value: kinds, comma-separated, or `none`.
    pub fn parse_list(text: &str) -> Result<Vec<Self>, String> {
        let text = text.trim();
        if text == "none" {
            return Ok(Vec::new());
        }
        let mut kinds = Vec::new();
        for name in text.split(',').map(str::trim) {
            let kind = Self::parse(name).ok_or_else(|| {
                format!("unknown attack {name:?}; one or more of hog, churn, slowloris, or none")
            })?;
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        kinds.sort();
        Ok(kinds)
    }

    /// Kinds as `--attack` takes them.
    pub fn list_name(kinds: &[Self]) -> String {
        if kinds.is_empty() {
            return "none".to_owned();
        }
        kinds
            .iter()
            .map(|kind| kind.name())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// How hard the attacker pushes. [`AttackConfig::default`] attacks nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttackConfig {
    pub kinds: Vec<AttackKind>,
    /// Most connections the attacker holds at once, over all servers.
    pub max_connections: usize,
    /// Source addresses it spreads over (127.66.0.1 and on).
    pub addresses: usize,
    /// Churn tasks per server.
    pub churn_tasks: usize,
    /// Opens per second of one churn task (at least 1): bounded so that the
    /// honest traffic on a 2-core machine still gets CPU.
    pub churn_rate: u32,
    /// The count every OPEN asks for.
    pub count: u16,
    /// Pause before a hog or slowloris slot that was refused tries again.
    pub retry_pause: Duration,
}

impl Default for AttackConfig {
    fn default() -> Self {
        Self {
            kinds: Vec::new(),
            max_connections: 1000,
            addresses: 4,
            churn_tasks: 2,
            churn_rate: 100,
            count: u16::MAX,
            retry_pause: Duration::from_millis(500),
        }
    }
}

/// What a slowloris connection sends before it falls silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowHello {
    Silent,
    /// The first this many bytes of an OPEN (never all of it).
    Partial(u8),
}

/// One attacker task: a hog or slowloris slot (one connection at a time),
/// or a churn loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttackUnit {
    pub kind: AttackKind,
    pub server: usize,
    pub source: Ipv4Addr,
    /// Mixed with the seed into everything the unit draws.
    pub stream: u64,
}

/// Everything the attacker will do, from the seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttackPlan {
    seed: u64,
    config: AttackConfig,
    units: Vec<AttackUnit>,
}

impl AttackPlan {
    /// Splits `config.max_connections` evenly over `servers`; on each, churn
    /// gets its tasks, and of the rest the hog two thirds and slowloris one
    /// third (or all of it when alone).
    pub fn new(config: &AttackConfig, seed: u64, servers: usize) -> Self {
        let mut units = Vec::new();
        if let Some(per_server) = config.max_connections.checked_div(servers) {
            let has = |kind| config.kinds.contains(&kind);
            let churn = if has(AttackKind::Churn) {
                config.churn_tasks.min(per_server)
            } else {
                0
            };
            let rest = per_server - churn;
            let hog = match (has(AttackKind::Hog), has(AttackKind::Slowloris)) {
                (true, true) => rest * 2 / 3,
                (true, false) => rest,
                (false, _) => 0,
            };
            let slowloris = if has(AttackKind::Slowloris) {
                rest - hog
            } else {
                0
            };
            let addresses = config.addresses.max(1);
            for server in 0..servers {
                let kinds = std::iter::repeat_n(AttackKind::Hog, hog)
                    .chain(std::iter::repeat_n(AttackKind::Slowloris, slowloris))
                    .chain(std::iter::repeat_n(AttackKind::Churn, churn));
                for (j, kind) in kinds.enumerate() {
                    units.push(AttackUnit {
                        kind,
                        server,
                        source: attacker_source(j % addresses),
                        stream: (server as u64) << 32 | j as u64,
                    });
                }
            }
        }
        Self {
            seed,
            config: config.clone(),
            units,
        }
    }

    pub fn units(&self) -> &[AttackUnit] {
        &self.units
    }

    pub fn config(&self) -> &AttackConfig {
        &self.config
    }

    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    /// Distinct source addresses, in order.
    pub fn sources(&self) -> Vec<Ipv4Addr> {
        let mut sources: Vec<Ipv4Addr> = self.units.iter().map(|u| u.source).collect();
        sources.sort();
        sources.dedup();
        sources
    }

    /// Most connections open at once: one per unit.
    pub fn max_connections(&self) -> usize {
        self.units.len()
    }

    /// The client id of `unit`'s `attempt`-th OPEN.
    pub fn client_id(&self, unit: &AttackUnit, attempt: u64) -> ClientId {
        let bytes: [u8; 16] = self.rng(unit, attempt, b"nsatkid1").random();
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }

    /// What `unit`'s `attempt`-th slowloris connection sends.
    pub fn slow_hello(&self, unit: &AttackUnit, attempt: u64) -> SlowHello {
        let mut rng = self.rng(unit, attempt, b"nsatksl1");
        if rng.random_bool(0.5) {
            SlowHello::Silent
        } else {
            SlowHello::Partial(rng.random_range(1..OPEN_LEN as u8))
        }
    }

    fn rng(&self, unit: &AttackUnit, attempt: u64, domain: &[u8; 8]) -> ChaCha8Rng {
        seeded_rng(self.seed, unit.stream, attempt, domain)
    }
}

impl fmt::Display for AttackPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let servers = self.units.iter().map(|u| u.server + 1).max().unwrap_or(0);
        let per_server = |kind| {
            self.units
                .iter()
                .filter(|u| u.kind == kind && u.server == 0)
                .count()
        };
        let sources = self.sources();
        write!(
            f,
            "{} on each of {servers} servers (hog {} slots, slowloris {} slots, churn {} tasks at {}/s), \
             at most {} connections, from {} addresses",
            AttackKind::list_name(&self.config.kinds),
            per_server(AttackKind::Hog),
            per_server(AttackKind::Slowloris),
            per_server(AttackKind::Churn),
            self.config.churn_rate,
            self.max_connections(),
            sources.len(),
        )?;
        if let (Some(first), Some(last)) = (sources.first(), sources.last()) {
            write!(f, " ({first}–{last})")?;
        }
        Ok(())
    }
}

/// How many connections the attacker may hold: what was asked, cut to what
/// the open-file limit leaves after `reserved` descriptors for everything
/// else in this process.
pub fn connection_budget(wanted: usize, open_file_limit: Option<u64>, reserved: u64) -> usize {
    match open_file_limit {
        Some(limit) => {
            let available = limit.saturating_sub(reserved);
            wanted.min(usize::try_from(available).unwrap_or(usize::MAX))
        }
        None => wanted,
    }
}

/// What one kind of attack achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindReport {
    /// Slots (hog, slowloris) or tasks (churn).
    pub units: usize,
    /// Connections opened (TCP connect succeeded).
    pub connections: u64,
    pub connect_failures: u64,
    /// WELCOMEs received: sessions the server opened for the attacker.
    pub sessions: u64,
    /// Connections held now: hog connections with a session, slowloris
    /// connections not yet closed.
    pub held: u64,
    /// Most held at once.
    pub held_peak: u64,
    /// ERROR frames received, by code.
    pub errors: BTreeMap<&'static str, u64>,
    /// Connections the server ended without a frame (EOF or reset).
    pub closed_silently: u64,
}

impl KindReport {
    fn render(&self, kind: AttackKind) -> String {
        let mut parts = vec![format!(
            "{} {} {}, {} connections opened",
            kind.name(),
            self.units,
            if kind == AttackKind::Churn {
                "tasks"
            } else {
                "slots"
            },
            self.connections
        )];
        if kind != AttackKind::Churn {
            parts.push(format!(
                "held at most {} at once ({} at the end)",
                self.held_peak, self.held
            ));
        }
        if kind != AttackKind::Slowloris {
            parts.push(format!("{} sessions opened", self.sessions));
        }
        let errors = if self.errors.is_empty() {
            "none".to_owned()
        } else {
            self.errors
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        parts.push(format!("errors received: {errors}"));
        parts.push(format!(
            "closed without a frame {}, connect failures {}",
            self.closed_silently, self.connect_failures
        ));
        parts.join("; ")
    }
}

/// What the attacker achieved, per kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttackReport {
    pub kinds: BTreeMap<AttackKind, KindReport>,
}

impl AttackReport {
    pub fn kind(&self, kind: AttackKind) -> KindReport {
        self.kinds.get(&kind).cloned().unwrap_or_default()
    }
}

impl fmt::Display for AttackReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (kind, report) in &self.kinds {
            writeln!(f, "attacker {}", report.render(*kind))?;
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct KindCounters {
    units: usize,
    connections: AtomicU64,
    connect_failures: AtomicU64,
    sessions: AtomicU64,
    held: AtomicU64,
    held_peak: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    closed_silently: AtomicU64,
}

impl KindCounters {
    fn hold(&self) {
        let held = self.held.fetch_add(1, Ordering::Relaxed) + 1;
        self.held_peak.fetch_max(held, Ordering::Relaxed);
    }

    fn release(&self) {
        self.held.fetch_sub(1, Ordering::Relaxed);
    }

    fn count(&self, reply: Reply) {
        match reply {
            Reply::Welcome => {
                self.sessions.fetch_add(1, Ordering::Relaxed);
            }
            Reply::Error(code) => self.error(code.as_str()),
            Reply::Unexpected => self.error("unexpected reply"),
            Reply::Closed => {
                self.closed_silently.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn error(&self, name: &'static str) {
        let mut errors = self
            .errors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *errors.entry(name).or_default() += 1;
    }

    fn snapshot(&self) -> KindReport {
        KindReport {
            units: self.units,
            connections: self.connections.load(Ordering::Relaxed),
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
            sessions: self.sessions.load(Ordering::Relaxed),
            held: self.held.load(Ordering::Relaxed),
            held_peak: self.held_peak.load(Ordering::Relaxed),
            errors: self
                .errors
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
            closed_silently: self.closed_silently.load(Ordering::Relaxed),
        }
    }
}

/// The server's first frame, as far as the attacker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Welcome,
    Error(ErrorCode),
    Unexpected,
    /// EOF or reset before a whole frame.
    Closed,
}

/// A running attacker. Dropping it stops every task (and closes every
/// connection) without waiting.
#[derive(Debug)]
pub struct Attacker {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    counters: Arc<BTreeMap<AttackKind, KindCounters>>,
}

impl Attacker {
    /// Starts every unit of `plan`, unit `u` against `servers[u.server]`.
    /// Units of servers not in the list do nothing.
    pub fn start(plan: AttackPlan, servers: Vec<SocketAddr>) -> Self {
        let counters: BTreeMap<AttackKind, KindCounters> = plan
            .config
            .kinds
            .iter()
            .map(|&kind| {
                let counters = KindCounters {
                    units: plan.units.iter().filter(|u| u.kind == kind).count(),
                    ..KindCounters::default()
                };
                (kind, counters)
            })
            .collect();
        let counters = Arc::new(counters);
        let stop = CancellationToken::new();
        let plan = Arc::new(plan);
        let tasks = plan
            .units
            .iter()
            .filter_map(|unit| Some((*unit, *servers.get(unit.server)?)))
            .map(|(unit, addr)| {
                let task = Task {
                    unit,
                    addr,
                    plan: plan.clone(),
                    counters: counters.clone(),
                    stop: stop.clone(),
                };
                tokio::spawn(task.run())
            })
            .collect();
        Self {
            stop,
            tasks,
            counters,
        }
    }

    /// What it achieved so far.
    pub fn report(&self) -> AttackReport {
        AttackReport {
            kinds: self
                .counters
                .iter()
                .map(|(kind, counters)| (*kind, counters.snapshot()))
                .collect(),
        }
    }

    /// Stops every task, closes every connection, and reports.
    pub async fn stop(mut self) -> AttackReport {
        self.stop.cancel();
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        self.report()
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One unit at work.
struct Task {
    unit: AttackUnit,
    addr: SocketAddr,
    plan: Arc<AttackPlan>,
    counters: Arc<BTreeMap<AttackKind, KindCounters>>,
    stop: CancellationToken,
}

impl Task {
    async fn run(self) {
        let Some(counters) = self.counters.get(&self.unit.kind) else {
            return;
        };
        match self.unit.kind {
            AttackKind::Hog => self.hog(counters).await,
            AttackKind::Churn => self.churn(counters).await,
            AttackKind::Slowloris => self.slowloris(counters).await,
        }
    }

    /// Holds one connection with a session at a time, never reading past
    /// its WELCOME; opens another when the server closes or refuses it.
    async fn hog(&self, counters: &KindCounters) {
        for attempt in 0.. {
            let Some(mut stream) = self.connect(counters, Some(HOG_RECEIVE_BUFFER)).await else {
                return;
            };
            let reply = tokio::select! {
                _ = self.stop.cancelled() => return,
                reply = self.open_session(&mut stream, attempt) => reply,
            };
            counters.count(reply);
            if reply == Reply::Welcome {
                counters.hold();
                let stopped = self.hold_unread(&stream).await;
                counters.release();
                if stopped {
                    return;
                }
            } else if !self.pause(self.plan.config.retry_pause).await {
                return;
            }
        }
    }

    /// Open-and-drop, paced: each open is a session the server keeps for
    /// its TTL.
    async fn churn(&self, counters: &KindCounters) {
        let rate = self.plan.config.churn_rate.max(1);
        let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        for attempt in 0.. {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let Some(mut stream) = self.connect(counters, None).await else {
                return;
            };
            let reply = tokio::select! {
                _ = self.stop.cancelled() => return,
                reply = timeout(CHURN_REPLY_TIMEOUT, self.open_session(&mut stream, attempt)) => reply,
            };
            match reply {
                Ok(reply) => counters.count(reply),
                Err(_) => counters.error("no reply in time"),
            }
            reset(&stream);
        }
    }

    /// Holds a connection in its handshake (silent, or a part of an OPEN)
    /// until the server closes it, then opens the next at once; after a
    /// refusal, pauses first.
    async fn slowloris(&self, counters: &KindCounters) {
        for attempt in 0.. {
            let Some(mut stream) = self.connect(counters, None).await else {
                return;
            };
            counters.hold();
            let held = tokio::select! {
                _ = self.stop.cancelled() => None,
                reply = self.stall_handshake(&mut stream, attempt) => Some(reply),
            };
            counters.release();
            let Some(reply) = held else {
                return;
            };
            counters.count(reply);
            let timed_out = reply == Reply::Error(ErrorCode::HandshakeTimeout);
            if !timed_out && !self.pause(self.plan.config.retry_pause).await {
                return;
            }
        }
    }

    /// Connects from the unit's address; after a failure (the server may be
    /// down for a restart), pauses and tries again. `None`: stopped.
    async fn connect(
        &self,
        counters: &KindCounters,
        receive_buffer: Option<u32>,
    ) -> Option<TcpStream> {
        loop {
            let attempt = async {
                let socket = socket_from(self.addr, IpAddr::V4(self.unit.source))?;
                if let Some(size) = receive_buffer {
                    socket.set_recv_buffer_size(size)?;
                }
                let stream = socket.connect(self.addr).await?;
                stream.set_nodelay(true)?;
                if receive_buffer.is_some() {
                    let keepalive = socket2::TcpKeepalive::new()
                        .with_time(HOG_KEEPALIVE)
                        .with_interval(HOG_KEEPALIVE)
                        .with_retries(3);
                    socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
                }
                Ok::<_, std::io::Error>(stream)
            };
            let connected = tokio::select! {
                _ = self.stop.cancelled() => return None,
                connected = timeout(CONNECT_TIMEOUT, attempt) => connected,
            };
            if let Ok(Ok(stream)) = connected {
                counters.connections.fetch_add(1, Ordering::Relaxed);
                return Some(stream);
            }
            counters.connect_failures.fetch_add(1, Ordering::Relaxed);
            if !self.pause(CONNECT_RETRY).await {
                return None;
            }
        }
    }

    async fn open_session(&self, stream: &mut TcpStream, attempt: u64) -> Reply {
        let open = self.open_frame(attempt);
        if stream.write_all(&open).await.is_err() {
            return Reply::Closed;
        }
        read_reply(stream).await
    }

    async fn stall_handshake(&self, stream: &mut TcpStream, attempt: u64) -> Reply {
        if let SlowHello::Partial(n) = self.plan.slow_hello(&self.unit, attempt) {
            let open = self.open_frame(attempt);
            let part = &open[..usize::from(n).min(open.len())];
            if stream.write_all(part).await.is_err() {
                return Reply::Closed;
            }
        }
        read_reply(stream).await
    }

    fn open_frame(&self, attempt: u64) -> BytesMut {
        let mut open = BytesMut::new();
        let frame = Frame::Open(Open {
            client_id: self.plan.client_id(&self.unit, attempt),
            count: self.plan.config.count,
        });
        encode_frame(&frame, &mut open);
        open
    }

    /// Waits, without reading, until the server closes `stream` (false) or
    /// the attacker stops (true).
    async fn hold_unread(&self, stream: &TcpStream) -> bool {
        loop {
            let ready = tokio::select! {
                _ = self.stop.cancelled() => return true,
                ready = stream.ready(Interest::READABLE) => ready,
            };
            match ready {
                Ok(ready) if !ready.is_read_closed() && !ready.is_error() => {
                    // Numbers waiting, left unread: look again later.
                    if !self.pause(HOG_CHECK_EVERY).await {
                        return true;
                    }
                }
                _ => return false,
            }
        }
    }

    /// Sleeps `pause`; false if the attacker stopped meanwhile.
    async fn pause(&self, pause: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(pause) => true,
        }
    }
}

/// Reads exactly the server's first frame (nothing after it).
async fn read_reply(stream: &mut TcpStream) -> Reply {
    let mut prefix = [0u8; LENGTH_PREFIX_LEN];
    if stream.read_exact(&mut prefix).await.is_err() {
        return Reply::Closed;
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 || len > MAX_PAYLOAD_LEN {
        return Reply::Unexpected;
    }
    let mut frame = BytesMut::zeroed(LENGTH_PREFIX_LEN + len);
    frame[..LENGTH_PREFIX_LEN].copy_from_slice(&prefix);
    if stream
        .read_exact(&mut frame[LENGTH_PREFIX_LEN..])
        .await
        .is_err()
    {
        return Reply::Closed;
    }
    match decode_frame(&mut frame) {
        Ok(Some(Frame::Welcome(_))) => Reply::Welcome,
        Ok(Some(Frame::Error(error))) => Reply::Error(error.code),
        _ => Reply::Unexpected,
    }
}

/// `SO_LINGER` 0: dropping the stream sends RST.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attack_lists_parse_and_render() {
        assert_eq!(AttackKind::parse_list("none"), Ok(Vec::new()));
        assert_eq!(
            AttackKind::parse_list("slowloris,hog,hog"),
            Ok(vec![AttackKind::Hog, AttackKind::Slowloris])
        );
        assert_eq!(
            AttackKind::list_name(&AttackKind::ALL),
            "hog,churn,slowloris"
        );
        assert_eq!(AttackKind::list_name(&[]), "none");
        let error = AttackKind::parse_list("hog,flood").expect_err("unknown kind");
        assert!(error.contains("\"flood\""), "{error}");
        assert!(AttackKind::parse_list("").is_err());
    }

    #[test]
    fn the_budget_is_cut_to_the_open_file_limit() {
        assert_eq!(connection_budget(1000, Some(20_000), 2_000), 1000);
        assert_eq!(connection_budget(1000, Some(1024), 500), 524);
        assert_eq!(connection_budget(1000, Some(1024), 2_000), 0);
        assert_eq!(connection_budget(1000, None, 2_000), 1000);
    }
}
