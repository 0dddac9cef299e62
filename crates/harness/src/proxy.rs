//! `FaultProxy`: a loopback TCP proxy that applies a [`ConnectionPlan`] to
//! every connection it forwards: the `n`-th connection gets
//! [`Planner::plan`]`(n)`. The chaos run plans from a seeded schedule;
//! tests queue exact plans ([`PlanQueue`], e.g. "close after 40 downstream
//! bytes") or cut every connection on command ([`FaultProxy::cut_all`]).
//! When each fault strikes and what it does is [`FaultState`]'s to decide;
//! this module moves the bytes.
//!
//! Each direction is a reader and a writer joined by a small bounded queue,
//! so latency delays chunks without reordering them and backpressure still
//! reaches the sender. Byte triggers are exact: the reader never reads past
//! the trigger byte before the fault has struck, so "reset after 40
//! downstream bytes" delivers exactly 40 bytes.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::fault::{ConnectionPlan, Direction, Fault, FaultKind, FaultState, Reaction};

/// Bound on connecting to the upstream server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time spent draining both sides after a FIN, so that closing a socket with
/// unread input does not turn the FIN into an RST.
const DRAIN_TIME: Duration = Duration::from_millis(500);
const CHUNK: usize = 16 * 1024;
/// In 1-byte-write mode, yield to the runtime after this many bytes.
const SPLIT_YIELD_EVERY: usize = 16;

/// Where each connection's plan comes from.
pub trait Planner: fmt::Debug + Send + Sync + 'static {
    /// The plan of the `ordinal`-th connection (from 0).
    fn plan(&self, ordinal: u64) -> ConnectionPlan;

    /// A label for the proxy's log lines (the chaos run's stream number).
    fn stream(&self) -> u64 {
        0
    }

    /// See [`FaultState::new`].
    fn protect_first_welcome(&self) -> bool {
        false
    }
}

/// Plans given in order, one per connection; connections past the queue
/// pass untouched. Push more at any time with [`PlanQueue::push`] (through
/// [`FaultProxy::planner`]).
#[derive(Debug, Default)]
pub struct PlanQueue {
    plans: Mutex<VecDeque<ConnectionPlan>>,
}

impl PlanQueue {
    pub fn new(plans: impl IntoIterator<Item = ConnectionPlan>) -> Self {
        Self {
            plans: Mutex::new(plans.into_iter().collect()),
        }
    }

    /// Queues plans for the next connections, one each.
    pub fn push(&self, plans: impl IntoIterator<Item = ConnectionPlan>) {
        lock(&self.plans).extend(plans);
    }
}

impl Planner for PlanQueue {
    fn plan(&self, _ordinal: u64) -> ConnectionPlan {
        lock(&self.plans)
            .pop_front()
            .unwrap_or(ConnectionPlan::PASS)
    }
}

/// Why a proxy cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "{what} address {addr} is not a loopback address: the fault proxy only \
         forwards between addresses in 127.0.0.0/8 or ::1"
    )]
    NotLoopback {
        what: &'static str,
        addr: SocketAddr,
    },
    #[error(
        "source address {source_ip} and upstream {upstream} are of different address \
         families: the proxy cannot connect from one to the other"
    )]
    FamilyMismatch {
        source_ip: IpAddr,
        upstream: SocketAddr,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Refuses anything but loopback: fault injection must never touch another
/// machine's traffic.
pub fn ensure_loopback(what: &'static str, addr: SocketAddr) -> Result<(), ProxyError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(ProxyError::NotLoopback { what, addr })
    }
}

/// Connects to `upstream` from `source` when given: on loopback every
/// 127.x.y.z is a distinct peer, which is how one process plays many users
/// (or an attacker beside them).
pub async fn connect_from(upstream: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    match source {
        Some(source) => socket_from(upstream, source)?.connect(upstream).await,
        None => TcpStream::connect(upstream).await,
    }
}

/// A socket bound to `source` (port chosen by the kernel), to connect to
/// `upstream` with: bind before connect, so the peer sees `source`.
pub fn socket_from(upstream: SocketAddr, source: IpAddr) -> io::Result<TcpSocket> {
    let socket = if upstream.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(source, 0))?;
    Ok(socket)
}

fn ensure_same_family(source: Option<IpAddr>, upstream: SocketAddr) -> Result<(), ProxyError> {
    match source {
        Some(source_ip) if source_ip.is_ipv4() != upstream.is_ipv4() => {
            Err(ProxyError::FamilyMismatch {
                source_ip,
                upstream,
            })
        }
        _ => Ok(()),
    }
}

/// What happened to one proxied connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionRecord {
    pub ordinal: u64,
    pub plan: ConnectionPlan,
    /// Whether the plan's fault actually struck (a connection may end
    /// before its trigger).
    pub fired: bool,
}

/// Counters over every connection of a proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyStats {
    pub connections: u64,
    pub upstream_unreachable: u64,
    pub faults: BTreeMap<FaultKind, u64>,
    pub with_latency: u64,
    pub with_split: u64,
}

impl ProxyStats {
    pub fn add(&mut self, other: &ProxyStats) {
        self.connections += other.connections;
        self.upstream_unreachable += other.upstream_unreachable;
        for (kind, n) in &other.faults {
            *self.faults.entry(*kind).or_default() += n;
        }
        self.with_latency += other.with_latency;
        self.with_split += other.with_split;
    }

    pub fn total_faults(&self) -> u64 {
        self.faults.values().sum()
    }
}

#[derive(Debug)]
struct Shared<P> {
    upstream: Mutex<SocketAddr>,
    /// The address upstream connections come from; `None`: the kernel's
    /// choice (127.0.0.1 on loopback).
    source: Option<IpAddr>,
    planner: P,
    /// Cancelled (and replaced) by `cut_all`.
    epoch: Mutex<CancellationToken>,
    next_ordinal: AtomicU64,
    stats: Mutex<ProxyStats>,
    records: Mutex<Vec<ConnectionRecord>>,
}

/// A running proxy. Dropping it stops accepting and cuts every connection.
#[derive(Debug)]
pub struct FaultProxy<P: Planner = PlanQueue> {
    addr: SocketAddr,
    shared: Arc<Shared<P>>,
    stop: CancellationToken,
}

impl FaultProxy<PlanQueue> {
    /// On 127.0.0.1 with a free port in front of `upstream`, every
    /// connection passing untouched until plans are queued
    /// ([`FaultProxy::planner`]`.push`).
    pub async fn start_queue(upstream: SocketAddr) -> Result<Self, ProxyError> {
        Self::start_local(upstream, PlanQueue::default()).await
    }
}

impl<P: Planner> FaultProxy<P> {
    /// Listens on `listen` (port 0 for a free one) and forwards every
    /// connection to `upstream`, the `n`-th one under `planner.plan(n)`.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        planner: P,
    ) -> Result<Self, ProxyError> {
        Self::start_from(listen, upstream, None, planner).await
    }

    /// [`FaultProxy::start`], connecting upstream from `source` (a loopback
    /// address of the upstream's family) when given, so the server sees
    /// this proxy's connections come from that address.
    pub async fn start_from(
        listen: SocketAddr,
        upstream: SocketAddr,
        source: Option<IpAddr>,
        planner: P,
    ) -> Result<Self, ProxyError> {
        ensure_loopback("listen", listen)?;
        ensure_loopback("upstream", upstream)?;
        if let Some(source) = source {
            ensure_loopback("source", SocketAddr::new(source, 0))?;
        }
        ensure_same_family(source, upstream)?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ProxyError::Listen {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ProxyError::Listen {
            addr: listen,
            source,
        })?;
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            source,
            planner,
            epoch: Mutex::new(CancellationToken::new()),
            next_ordinal: AtomicU64::new(0),
            stats: Mutex::new(ProxyStats::default()),
            records: Mutex::new(Vec::new()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), stop.clone()));
        Ok(Self { addr, shared, stop })
    }

    /// On 127.0.0.1 with a free port.
    pub async fn start_local(upstream: SocketAddr, planner: P) -> Result<Self, ProxyError> {
        Self::start(SocketAddr::from(([127, 0, 0, 1], 0)), upstream, planner).await
    }

    /// On 127.0.0.1 with a free port, connecting upstream from `source`.
    pub async fn start_local_from(
        upstream: SocketAddr,
        source: IpAddr,
        planner: P,
    ) -> Result<Self, ProxyError> {
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_from(listen, upstream, Some(source), planner).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Where upstream connections come from (`None`: the kernel's choice).
    pub fn source(&self) -> Option<IpAddr> {
        self.shared.source
    }

    /// Points new connections at another (loopback) upstream.
    pub fn set_upstream(&self, upstream: SocketAddr) -> Result<(), ProxyError> {
        ensure_loopback("upstream", upstream)?;
        ensure_same_family(self.shared.source, upstream)?;
        *lock(&self.shared.upstream) = upstream;
        Ok(())
    }

    pub fn stats(&self) -> ProxyStats {
        lock(&self.shared.stats).clone()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.next_ordinal.load(Ordering::SeqCst)
    }

    /// Closes every connection open right now (both sides get FIN); later
    /// ones are planned as usual.
    pub fn cut_all(&self) {
        let mut epoch = lock(&self.shared.epoch);
        epoch.cancel();
        *epoch = CancellationToken::new();
    }

    /// Every connection so far, in the order they were accepted.
    pub fn records(&self) -> Vec<ConnectionRecord> {
        lock(&self.shared.records).clone()
    }

    pub fn planner(&self) -> &P {
        &self.shared.planner
    }
}

impl<P: Planner> Drop for FaultProxy<P> {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn accept_loop<P: Planner>(
    listener: TcpListener,
    shared: Arc<Shared<P>>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (client, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let ordinal = shared.next_ordinal.fetch_add(1, Ordering::SeqCst);
        let plan = shared.planner.plan(ordinal);
        {
            let mut stats = lock(&shared.stats);
            stats.connections += 1;
            stats.with_latency += u64::from(plan.latency.is_some());
            stats.with_split += u64::from(plan.split.is_some());
        }
        lock(&shared.records).push(ConnectionRecord {
            ordinal,
            plan,
            fired: false,
        });
        info!(
            stream = shared.planner.stream(),
            ordinal,
            %peer,
            %plan,
            "connection"
        );
        let cut = lock(&shared.epoch).clone();
        tokio::spawn(serve(
            client,
            shared.clone(),
            ordinal,
            plan,
            stop.clone(),
            cut,
        ));
    }
}

/// How the forwarding of one connection ended.
enum End {
    /// Both directions reached their end.
    Finished,
    Close,
    Reset,
    /// A stall or half-close was held for its time.
    HoldExpired,
    /// The proxy was dropped.
    Stopped,
    /// [`FaultProxy::cut_all`].
    Cut,
}

async fn serve<P: Planner>(
    mut client: TcpStream,
    shared: Arc<Shared<P>>,
    ordinal: u64,
    plan: ConnectionPlan,
    stop: CancellationToken,
    cut: CancellationToken,
) {
    let upstream = *lock(&shared.upstream);
    let connect = connect_from(upstream, shared.source);
    let mut server = match timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(server)) => server,
        _ => {
            // Like a server that is down: the client sees its connection
            // end before any byte.
            lock(&shared.stats).upstream_unreachable += 1;
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let ctx = Ctx::new(plan, shared.planner.protect_first_welcome());
    let end = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let up = pump(client_read, server_write, Direction::Upstream, &ctx);
        let down = pump(server_read, client_write, Direction::Downstream, &ctx);
        supervise(up, down, &ctx, &stop, &cut, || struck(&shared, ordinal)).await
    };
    match end {
        End::Finished | End::Stopped => {}
        End::Close | End::HoldExpired | End::Cut => close_both(client, server).await,
        End::Reset => {
            reset(&client);
            reset(&server);
        }
    }
}

/// Counts and logs the fault of connection `ordinal` the moment it strikes
/// (a stalled connection may outlive the run that reads the statistics).
fn struck<P: Planner>(shared: &Shared<P>, ordinal: u64) {
    let mut records = lock(&shared.records);
    let Some(record) = records.iter_mut().find(|r| r.ordinal == ordinal) else {
        return;
    };
    record.fired = true;
    if let Some(fault) = record.plan.fault {
        *lock(&shared.stats).faults.entry(fault.kind()).or_default() += 1;
        info!(stream = shared.planner.stream(), ordinal, %fault, "fault struck");
    }
}

/// Runs both directions until they end, the fault calls for the
/// connection's end, or the proxy stops.
async fn supervise(
    up: impl Future<Output = ()>,
    down: impl Future<Output = ()>,
    ctx: &Ctx,
    stop: &CancellationToken,
    cut: &CancellationToken,
    on_strike: impl FnOnce(),
) -> End {
    let mut on_strike = Some(on_strike);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let timer = ctx.state().time_trigger().map(|delay| ctx.started + delay);
    let mut timer_pending = timer.is_some();
    let mut fire_pending = ctx.plan.fault.is_some();
    let mut hold_until: Option<Instant> = None;
    loop {
        if up_done && down_done {
            return End::Finished;
        }
        tokio::select! {
            _ = stop.cancelled() => return End::Stopped,
            _ = cut.cancelled() => return End::Cut,
            _ = &mut up, if !up_done => up_done = true,
            _ = &mut down, if !down_done => down_done = true,
            _ = sleep_until(timer.unwrap_or_else(Instant::now)), if timer_pending => {
                timer_pending = false;
                ctx.time_expired();
            }
            _ = ctx.fired.cancelled(), if fire_pending => {
                fire_pending = false;
                if let Some(on_strike) = on_strike.take() {
                    on_strike();
                }
                match ctx.plan.fault {
                    Some(Fault::Close(_)) => return End::Close,
                    Some(Fault::Reset(_)) => return End::Reset,
                    Some(Fault::Stall { hold, .. } | Fault::HalfClose { hold, .. }) => {
                        hold_until = Some(Instant::now() + hold);
                    }
                    None => {}
                }
            }
            _ = sleep_until(hold_until.unwrap_or_else(Instant::now)), if hold_until.is_some() => {
                return End::HoldExpired;
            }
        }
    }
}

/// One connection's [`FaultState`], shared by its two directions and its
/// supervisor, with its transitions as tokens to wait on.
struct Ctx {
    plan: ConnectionPlan,
    started: Instant,
    state: Mutex<FaultState>,
    /// The trigger point was reached (the fault may still be held back).
    hit: CancellationToken,
    /// The fault struck.
    fired: CancellationToken,
}

impl Ctx {
    fn new(plan: ConnectionPlan, protect_first_welcome: bool) -> Self {
        Self {
            plan,
            started: Instant::now(),
            state: Mutex::new(FaultState::new(plan, protect_first_welcome)),
            hit: CancellationToken::new(),
            fired: CancellationToken::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, FaultState> {
        lock(&self.state)
    }

    fn byte_trigger(&self, direction: Direction) -> Option<u64> {
        self.state().byte_trigger(direction)
    }

    fn delivered(&self, direction: Direction, bytes: &[u8]) {
        let mut state = self.state();
        state.delivered(direction, bytes);
        self.publish(&state);
    }

    fn time_expired(&self) {
        let mut state = self.state();
        state.time_expired();
        self.publish(&state);
    }

    /// Wakes whoever waits for the hit or the strike.
    fn publish(&self, state: &FaultState) {
        if state.is_hit() {
            self.hit.cancel();
        }
        if state.is_fired() {
            self.fired.cancel();
        }
    }

    fn on_fire(&self, direction: Direction) -> Reaction {
        self.state().reaction(direction)
    }
}

enum Chunk {
    Data { due: Instant, bytes: Vec<u8> },
    Eof,
}

/// Forwards one direction until its end, under the plan.
async fn pump(from: ReadHalf<'_>, to: WriteHalf<'_>, direction: Direction, ctx: &Ctx) {
    let (tx, rx) = mpsc::channel(8);
    tokio::join!(
        read_side(from, tx, direction, ctx),
        write_side(to, rx, direction, ctx)
    );
}

async fn read_side(
    mut from: ReadHalf<'_>,
    tx: mpsc::Sender<Chunk>,
    direction: Direction,
    ctx: &Ctx,
) {
    let latency = ctx.plan.latency.unwrap_or_default();
    let interruptible = ctx.on_fire(direction) != Reaction::Continue;
    let mut buf = vec![0u8; CHUNK];
    let mut read_total: u64 = 0;
    loop {
        if ctx.fired.is_cancelled() {
            match ctx.on_fire(direction) {
                Reaction::Continue => {}
                Reaction::Stop | Reaction::Freeze => return std::future::pending().await,
                Reaction::HalfClose => return discard(&mut from).await,
            }
        }
        let mut want = CHUNK;
        if let Some(after) = ctx.byte_trigger(direction) {
            if read_total >= after {
                // Everything up to the trigger is read; nothing more until
                // the fault has struck (or was held back and released).
                tokio::select! {
                    _ = ctx.hit.cancelled() => {}
                    _ = ctx.fired.cancelled() => {}
                }
                continue;
            }
            want = want.min((after - read_total) as usize);
        }
        let read = tokio::select! {
            biased;
            _ = ctx.fired.cancelled(), if interruptible => continue,
            read = from.read(&mut buf[..want]) => read,
        };
        let n = match read {
            Ok(0) => {
                let _ = tx.send(Chunk::Eof).await;
                return;
            }
            Ok(n) => n,
            // The writer sees the channel close and ends this direction.
            Err(_) => return,
        };
        read_total += n as u64;
        let chunk = Chunk::Data {
            due: Instant::now() + latency,
            bytes: buf[..n].to_vec(),
        };
        if tx.send(chunk).await.is_err() {
            return;
        }
    }
}

async fn write_side(
    mut to: WriteHalf<'_>,
    mut rx: mpsc::Receiver<Chunk>,
    direction: Direction,
    ctx: &Ctx,
) {
    let split = ctx.plan.split == Some(direction);
    // Directions the fault leaves alone never drop a byte.
    let interruptible = ctx.on_fire(direction) != Reaction::Continue;
    loop {
        let reacting = interruptible && ctx.fired.is_cancelled();
        if reacting {
            match ctx.on_fire(direction) {
                Reaction::Continue => {}
                Reaction::Stop | Reaction::Freeze => return std::future::pending().await,
                Reaction::HalfClose => {
                    let _ = to.shutdown().await;
                    return;
                }
            }
        }
        let chunk = tokio::select! {
            biased;
            _ = ctx.fired.cancelled(), if interruptible => continue,
            chunk = rx.recv() => chunk,
        };
        let (due, bytes) = match chunk {
            None => return,
            Some(Chunk::Eof) => {
                // Pass the half-close on, as TCP would.
                let _ = to.shutdown().await;
                return;
            }
            Some(Chunk::Data { due, bytes }) => (due, bytes),
        };
        tokio::select! {
            biased;
            _ = ctx.fired.cancelled(), if interruptible => continue,
            _ = sleep_until(due) => {}
        }
        let pieces: Vec<&[u8]> = if split {
            bytes.chunks(1).collect()
        } else {
            vec![&bytes[..]]
        };
        let mut written = 0;
        for piece in pieces {
            if interruptible && ctx.fired.is_cancelled() {
                // The fault struck mid-chunk: the rest is never delivered.
                break;
            }
            if to.write_all(piece).await.is_err() {
                return;
            }
            ctx.delivered(direction, piece);
            written += piece.len();
            if split && written % SPLIT_YIELD_EVERY == 0 {
                // Let the receiver see the pieces on their own; not after
                // every byte, which on a busy runtime would turn 1-byte
                // writes into a link of a few hundred bytes per second.
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Reads and drops everything until EOF or an error.
async fn discard(from: &mut ReadHalf<'_>) {
    let mut buf = vec![0u8; CHUNK];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// FIN to both sides, then a bounded drain so the kernel sends FIN rather
/// than RST for input we never read.
async fn close_both(mut client: TcpStream, mut server: TcpStream) {
    let _ = timeout(DRAIN_TIME, async {
        let _ = client.shutdown().await;
        let _ = server.shutdown().await;
    })
    .await;
    let _ = timeout(DRAIN_TIME, async {
        let (mut client_read, _) = client.split();
        let (mut server_read, _) = server.split();
        tokio::join!(discard(&mut client_read), discard(&mut server_read));
    })
    .await;
}

/// `SO_LINGER` 0: closing the socket sends RST and drops unsent data.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
