//! Per-source-address quotas: what one peer may take of this server, so
//! that no single client (one machine, or one IPv6 /64) can deny service to
//! the others by holding every connection, filling the session table or
//! opening sessions faster than they can be served.
//!
//! Four limits, each optional ([`PeerLimits`]):
//!
//! - **connections** held at once, in any state;
//! - **handshake slots**: connections that have not yet sent a complete
//!   OPEN or RESUME. They cost the attacker nothing but a SYN, so they get
//!   a tighter bound than connections (slowloris);
//! - **sessions held**: sessions the address created here that are
//!   streaming or awaiting a resume. A held session is counted against the
//!   address that opened it until it completes, the store says it is gone,
//!   or a session TTL has passed since this server last saw it detached
//!   (plus at most one sweep period, [`SWEEP_EVERY`]);
//! - **new sessions per second**: a token bucket, so opening and dropping
//!   sessions in a loop buys an address only so many store writes, CRC
//!   computations and log lines a second.
//!
//! Peers are grouped by address: an IPv4 address, or the /64 of an IPv6
//! address (a single host is usually given a whole /64 and can rotate
//! through it at will). IPv4-mapped IPv6 addresses count as IPv4.
//!
//! Every instance enforces its own quotas: behind a load balancer that
//! spreads one address over N instances, that address may take N times
//! as much in all, which is still a bounded share of each instance.
//!
//! Touched once per connection event (accept, hello, close) and once per
//! session event (open, resume, end), never per number. The tables are
//! sharded so concurrent accepts on a multi-threaded runtime rarely
//! contend.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use numstream_protocol::{ClientId, ErrorCode, ErrorFrame};
use tokio::time::Instant;

const SHARDS: usize = 16;

/// How often expired session holds and idle address entries are freed.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// One peer as the quotas see it: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    V4(Ipv4Addr),
    /// The upper 64 bits of the address.
    V6Prefix(u64),
}

impl From<IpAddr> for PeerKey {
    fn from(address: IpAddr) -> Self {
        match address {
            IpAddr::V4(v4) => PeerKey::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => PeerKey::V4(v4),
                None => PeerKey::V6Prefix((v6.to_bits() >> 64) as u64),
            },
        }
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerKey::V4(v4) => write!(f, "{v4}"),
            PeerKey::V6Prefix(prefix) => {
                let network = std::net::Ipv6Addr::from_bits(u128::from(*prefix) << 64);
                write!(f, "{network}/64")
            }
        }
    }
}

/// A sustained rate with a burst allowance (a token bucket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRate {
    /// Tokens added per second.
    pub per_second: u32,
    /// Bucket size: how many may be taken at once after a quiet spell.
    pub burst: u32,
}

/// What one peer may take; `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLimits {
    pub connections: Option<u32>,
    pub handshakes: Option<u32>,
    pub sessions: Option<u32>,
    pub new_sessions: Option<SessionRate>,
}

/// Default share of a global cap one address may take.
const DEFAULT_SHARE_DIVISOR: usize = 10;
/// Floors under the derived defaults, so a small server still lets one
/// address (a NAT, a test machine) run a useful number of clients.
const MIN_CONNECTIONS: u32 = 64;
const MIN_HANDSHAKES: u32 = 16;
const MIN_SESSIONS: u32 = 64;
/// New sessions per second and burst per address by default: far more
/// than one user starts by hand, far less than a loop can (thousands).
pub const DEFAULT_SESSION_RATE: SessionRate = SessionRate {
    per_second: 50,
    burst: 100,
};

impl PeerLimits {
    /// No per-address limits at all (only the global caps apply).
    pub const UNLIMITED: PeerLimits = PeerLimits {
        connections: None,
        handshakes: None,
        sessions: None,
        new_sessions: None,
    };

    /// The defaults for a server with these global caps: each address may
    /// take a tenth of the connections and of the sessions (at least 64 of
    /// each), a quarter of its connections may be in their handshake at
    /// once (at least 16), and it may open [`DEFAULT_SESSION_RATE`]
    /// sessions a second. A share that would reach its cap is no limit at
    /// all (`None`): on a server that small the cap itself is what an
    /// address runs into, and its refusal should say so.
    pub fn derived(max_connections: usize, max_sessions: usize) -> Self {
        let share = |cap: usize, part: usize, floor: u32| {
            let share = u32::try_from(cap / part).unwrap_or(u32::MAX).max(floor);
            (usize::try_from(share).unwrap_or(usize::MAX) < cap).then_some(share)
        };
        let connections = share(max_connections, DEFAULT_SHARE_DIVISOR, MIN_CONNECTIONS);
        Self {
            connections,
            handshakes: Self::handshakes_for(connections.map_or(max_connections, |c| c as usize)),
            sessions: share(max_sessions, DEFAULT_SHARE_DIVISOR, MIN_SESSIONS),
            new_sessions: Some(DEFAULT_SESSION_RATE),
        }
    }

    /// The default handshake share of an address that may hold
    /// `connections`: a quarter, at least 16, `None` where that is all.
    pub fn handshakes_for(connections: usize) -> Option<u32> {
        let share = u32::try_from(connections / 4)
            .unwrap_or(u32::MAX)
            .max(MIN_HANDSHAKES);
        (usize::try_from(share).unwrap_or(usize::MAX) < connections).then_some(share)
    }
}

/// Why a peer was refused: it is over one of its own quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Connections(u32),
    Handshakes(u32),
    Sessions(u32),
    SessionRate(SessionRate),
}

impl Refusal {
    /// What the peer is told: `server_busy` (retry), with which quota of
    /// its own it is over, so a user behind a shared address understands.
    pub(crate) fn error_frame(self, peer: PeerKey) -> ErrorFrame {
        let message = match self {
            Refusal::Connections(limit) => format!(
                "your address {peer} already has {limit} connections open, the most one address \
                 may hold here; close some or try again later"
            ),
            Refusal::Handshakes(limit) => format!(
                "your address {peer} already has {limit} connections that have not sent OPEN or \
                 RESUME, the most one address may hold here; try again later"
            ),
            Refusal::Sessions(limit) => format!(
                "your address {peer} already holds {limit} sessions (streaming or awaiting a \
                 resume), the most one address may hold here; finish some or try again later"
            ),
            Refusal::SessionRate(rate) => format!(
                "your address {peer} opens sessions faster than the {} a second (bursts of {}) \
                 one address may open here; try again shortly",
                rate.per_second, rate.burst
            ),
        };
        ErrorFrame::new(ErrorCode::ServerBusy, message)
    }
}

/// What one address currently takes.
#[derive(Debug)]
struct Usage {
    connections: u32,
    handshakes: u32,
    sessions: u32,
    /// Tokens left for new sessions, as of `refilled`.
    tokens: f64,
    refilled: Instant,
}

impl Usage {
    fn new(now: Instant, rate: Option<SessionRate>) -> Self {
        Self {
            connections: 0,
            handshakes: 0,
            sessions: 0,
            tokens: rate.map_or(0.0, |rate| f64::from(rate.burst)),
            refilled: now,
        }
    }

    fn refill(&mut self, now: Instant, rate: SessionRate) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * f64::from(rate.per_second)).min(f64::from(rate.burst));
        self.refilled = now;
    }

    /// Holds nothing and would start afresh: the entry can go.
    fn is_idle(&mut self, now: Instant, rate: Option<SessionRate>) -> bool {
        if self.connections > 0 || self.handshakes > 0 || self.sessions > 0 {
            return false;
        }
        match rate {
            Some(rate) => {
                self.refill(now, rate);
                self.tokens >= f64::from(rate.burst)
            }
            None => true,
        }
    }
}

/// A session counted against the address that opened it.
#[derive(Debug, Clone, Copy)]
struct Hold {
    peer: PeerKey,
    /// `None` while a connection of this server streams it; otherwise when
    /// it stops counting (its TTL from the last detach seen here).
    until: Option<Instant>,
}

/// Every address's usage, and the sessions held against them.
#[derive(Debug)]
pub(crate) struct Peers {
    limits: PeerLimits,
    usage: Box<[Mutex<HashMap<PeerKey, Usage>>]>,
    holds: Box<[Mutex<HashMap<ClientId, Hold>>]>,
}

fn shard_of(hash: u64) -> usize {
    (hash % SHARDS as u64) as usize
}

fn peer_hash(peer: &PeerKey) -> u64 {
    match peer {
        PeerKey::V4(v4) => u64::from(v4.to_bits()).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32,
        PeerKey::V6Prefix(prefix) => prefix.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the counts consistent before anything
    // in it could panic, so a poisoned shard still holds valid data.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Peers {
    pub(crate) fn new(limits: PeerLimits) -> Self {
        Self {
            limits,
            usage: (0..SHARDS).map(|_| Mutex::default()).collect(),
            holds: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn usage(&self, peer: &PeerKey) -> MutexGuard<'_, HashMap<PeerKey, Usage>> {
        lock(&self.usage[shard_of(peer_hash(peer))])
    }

    fn holds(&self, client_id: &ClientId) -> MutexGuard<'_, HashMap<ClientId, Hold>> {
        let (high, low) = client_id.as_u64_pair();
        lock(&self.holds[shard_of(high ^ low)])
    }

    /// Admits a new connection from `peer` into a connection slot and a
    /// handshake slot, or says which of its quotas it is over.
    pub(crate) fn admit_connection(self: &Arc<Self>, peer: PeerKey) -> Result<PeerTicket, Refusal> {
        self.with_usage(peer, |usage, _| self.take_connection(usage))?;
        Ok(PeerTicket {
            peers: self.clone(),
            peer,
            handshaking: true,
        })
    }

    /// Runs `f` on `peer`'s usage (made fresh if it has none) under its
    /// shard's lock, with the time now.
    fn with_usage<R>(&self, peer: PeerKey, f: impl FnOnce(&mut Usage, Instant) -> R) -> R {
        let now = Instant::now();
        let mut table = self.usage(&peer);
        let usage = table
            .entry(peer)
            .or_insert_with(|| Usage::new(now, self.limits.new_sessions));
        f(usage, now)
    }

    fn take_connection(&self, usage: &mut Usage) -> Result<(), Refusal> {
        if let Some(limit) = self.limits.connections
            && usage.connections >= limit
        {
            return Err(Refusal::Connections(limit));
        }
        if let Some(limit) = self.limits.handshakes
            && usage.handshakes >= limit
        {
            return Err(Refusal::Handshakes(limit));
        }
        usage.connections += 1;
        usage.handshakes += 1;
        Ok(())
    }

    /// Admits a new session (an OPEN) from `peer`: checks the sessions it
    /// holds, then takes a token from its bucket. The session counts from
    /// now; [`SessionReservation::commit`] ties it to its client id once
    /// the store has created it, and dropping the reservation uncommitted
    /// gives the slot back (the token stays spent: a refused OPEN cost the
    /// store a write too).
    pub(crate) fn admit_session(
        self: &Arc<Self>,
        peer: PeerKey,
    ) -> Result<SessionReservation, Refusal> {
        let counted = self.with_usage(peer, |usage, now| self.take_session(usage, now))?;
        Ok(SessionReservation {
            peers: self.clone(),
            peer,
            counted,
        })
    }

    /// Takes a session slot (when the quota is on: the result says) and a
    /// token from the bucket.
    fn take_session(&self, usage: &mut Usage, now: Instant) -> Result<bool, Refusal> {
        if let Some(limit) = self.limits.sessions
            && usage.sessions >= limit
        {
            return Err(Refusal::Sessions(limit));
        }
        if let Some(rate) = self.limits.new_sessions {
            usage.refill(now, rate);
            if usage.tokens < 1.0 {
                return Err(Refusal::SessionRate(rate));
            }
            usage.tokens -= 1.0;
        }
        let counted = self.limits.sessions.is_some();
        if counted {
            usage.sessions += 1;
        }
        Ok(counted)
    }

    fn release_session_slot(&self, peer: PeerKey) {
        if let Some(usage) = self.usage(&peer).get_mut(&peer) {
            usage.sessions = usage.sessions.saturating_sub(1);
        }
    }

    /// A session this server holds a count for is streaming here again (a
    /// resume): it counts until its connection ends, whatever its TTL.
    pub(crate) fn session_attached(&self, client_id: ClientId) {
        if self.limits.sessions.is_none() {
            return;
        }
        if let Some(hold) = self.holds(&client_id).get_mut(&client_id) {
            hold.until = None;
        }
    }

    /// The session's connection here ended without ending the session
    /// (a detach, a takeover): it counts for one more `ttl`, the longest
    /// it can still be resumed without this server hearing of it.
    pub(crate) fn session_detached(&self, client_id: ClientId, ttl: Duration) {
        if self.limits.sessions.is_none() {
            return;
        }
        if let Some(hold) = self.holds(&client_id).get_mut(&client_id) {
            hold.until = Some(Instant::now() + ttl);
        }
    }

    /// The session is over (completed, or gone from the store).
    pub(crate) fn session_ended(&self, client_id: ClientId) {
        if self.limits.sessions.is_none() {
            return;
        }
        let removed = self.holds(&client_id).remove(&client_id);
        if let Some(hold) = removed {
            self.release_session_slot(hold.peer);
        }
    }

    /// Frees session holds whose time is up and addresses that hold
    /// nothing. Each shard is locked on its own, briefly.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let mut released = Vec::new();
        for shard in self.holds.iter() {
            lock(shard).retain(|_, hold| {
                let keep = hold.until.is_none_or(|until| until > now);
                if !keep {
                    released.push(hold.peer);
                }
                keep
            });
        }
        for peer in released {
            self.release_session_slot(peer);
        }
        let rate = self.limits.new_sessions;
        for shard in self.usage.iter() {
            lock(shard).retain(|_, usage| !usage.is_idle(now, rate));
        }
    }

    /// Sweeps every [`SWEEP_EVERY`] until the last `Arc` is dropped.
    pub(crate) fn spawn_sweeper(self: &Arc<Self>) {
        let peers: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(SWEEP_EVERY);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(peers) = peers.upgrade() else { return };
                peers.sweep();
            }
        });
    }

    /// What `peer` holds now: connections, handshakes, sessions.
    #[cfg(test)]
    fn held_by(&self, peer: PeerKey) -> (u32, u32, u32) {
        self.usage(&peer)
            .get(&peer)
            .map_or((0, 0, 0), |u| (u.connections, u.handshakes, u.sessions))
    }

    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.usage.iter().map(|shard| lock(shard).len()).sum()
    }
}

/// A connection's place under its address's quotas, given back on drop.
#[derive(Debug)]
pub(crate) struct PeerTicket {
    peers: Arc<Peers>,
    peer: PeerKey,
    handshaking: bool,
}

impl PeerTicket {
    pub(crate) fn peer(&self) -> PeerKey {
        self.peer
    }

    /// The connection delivered its hello: its handshake slot is free.
    pub(crate) fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking)
            && let Some(usage) = self.peers.usage(&self.peer).get_mut(&self.peer)
        {
            usage.handshakes = usage.handshakes.saturating_sub(1);
        }
    }
}

impl Drop for PeerTicket {
    fn drop(&mut self) {
        let mut table = self.peers.usage(&self.peer);
        if let Some(usage) = table.get_mut(&self.peer) {
            usage.connections = usage.connections.saturating_sub(1);
            if self.handshaking {
                usage.handshakes = usage.handshakes.saturating_sub(1);
            }
        }
    }
}

/// A session slot taken by [`Peers::admit_session`].
#[derive(Debug)]
pub(crate) struct SessionReservation {
    peers: Arc<Peers>,
    peer: PeerKey,
    /// Whether a slot was taken (the session quota is on).
    counted: bool,
}

impl SessionReservation {
    /// The store created the session: it counts against the peer until
    /// [`Peers::session_ended`], or a TTL after its last detach.
    pub(crate) fn commit(mut self, client_id: ClientId) {
        if !std::mem::take(&mut self.counted) {
            return;
        }
        let hold = Hold {
            peer: self.peer,
            until: None,
        };
        let replaced = self.peers.holds(&client_id).insert(client_id, hold);
        // The same client id opened again after its session ended unseen
        // (expired elsewhere): one session, counted once.
        if let Some(previous) = replaced {
            self.peers.release_session_slot(previous.peer);
        }
    }
}

impl Drop for SessionReservation {
    fn drop(&mut self) {
        if self.counted {
            self.peers.release_session_slot(self.peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn v4(last: u8) -> PeerKey {
        PeerKey::from(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)))
    }

    fn limits() -> PeerLimits {
        PeerLimits {
            connections: Some(3),
            handshakes: Some(2),
            sessions: Some(2),
            new_sessions: Some(SessionRate {
                per_second: 10,
                burst: 3,
            }),
        }
    }

    #[test]
    fn ipv6_peers_are_grouped_by_their_64_and_mapped_v4_is_v4() {
        let a: Ipv6Addr = "2001:db8:1:2:aaaa::1".parse().expect("v6");
        let b: Ipv6Addr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().expect("v6");
        let c: Ipv6Addr = "2001:db8:1:3::1".parse().expect("v6");
        assert_eq!(PeerKey::from(IpAddr::V6(a)), PeerKey::from(IpAddr::V6(b)));
        assert_ne!(PeerKey::from(IpAddr::V6(a)), PeerKey::from(IpAddr::V6(c)));
        assert_eq!(
            PeerKey::from(IpAddr::V6(a)).to_string(),
            "2001:db8:1:2::/64"
        );
        let mapped: Ipv6Addr = "::ffff:192.0.2.7".parse().expect("mapped");
        assert_eq!(PeerKey::from(IpAddr::V6(mapped)), v4(7));
        assert_eq!(v4(7).to_string(), "192.0.2.7");
    }

    #[test]
    fn derived_defaults_take_a_tenth_with_floors_and_never_exceed_the_cap() {
        let big = PeerLimits::derived(10_000, 100_000);
        assert_eq!(big.connections, Some(1_000));
        assert_eq!(big.handshakes, Some(250));
        assert_eq!(big.sessions, Some(10_000));
        assert_eq!(big.new_sessions, Some(DEFAULT_SESSION_RATE));
        let small = PeerLimits::derived(672, 3_000);
        assert_eq!(small.connections, Some(67));
        assert_eq!(small.handshakes, Some(16));
        assert_eq!(small.sessions, Some(300));
        // Where a share would reach the cap, the cap alone applies.
        let tiny = PeerLimits::derived(10, 64);
        assert_eq!(tiny.connections, None);
        assert_eq!(tiny.handshakes, None);
        assert_eq!(tiny.sessions, None);
        assert_eq!(tiny.new_sessions, Some(DEFAULT_SESSION_RATE));
        let edge = PeerLimits::derived(65, 65);
        assert_eq!(edge.connections, Some(64));
        assert_eq!(edge.handshakes, Some(16));
        assert_eq!(edge.sessions, Some(64));
        let huge = PeerLimits::derived(usize::MAX, usize::MAX);
        assert!(huge.connections.is_some() && huge.sessions.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn connections_and_handshakes_are_bounded_per_address_and_given_back() {
        let peers = Arc::new(Peers::new(limits()));
        let mut first = peers.admit_connection(v4(1)).expect("first");
        let _second = peers.admit_connection(v4(1)).expect("second");
        assert_eq!(
            peers.admit_connection(v4(1)).map(drop),
            Err(Refusal::Handshakes(2)),
            "two connections are still in their handshake"
        );
        first.handshake_done();
        first.handshake_done(); // idempotent
        let third = peers
            .admit_connection(v4(1))
            .expect("a handshake slot is free again");
        assert_eq!(peers.held_by(v4(1)), (3, 2, 0));
        assert_eq!(
            peers.admit_connection(v4(1)).map(drop),
            Err(Refusal::Connections(3))
        );
        // Another address is unaffected.
        let _other = peers.admit_connection(v4(2)).expect("another address");
        drop(third);
        assert_eq!(peers.held_by(v4(1)), (2, 1, 0));
        drop(first);
        assert_eq!(peers.held_by(v4(1)), (1, 1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_held_count_until_ended_or_a_ttl_after_detach() {
        let peers = Arc::new(Peers::new(PeerLimits {
            new_sessions: None,
            ..limits()
        }));
        let (a, b, c) = (
            ClientId::from_u128(1),
            ClientId::from_u128(2),
            ClientId::from_u128(3),
        );
        peers.admit_session(v4(1)).expect("first").commit(a);
        peers.admit_session(v4(1)).expect("second").commit(b);
        assert_eq!(
            peers.admit_session(v4(1)).map(drop),
            Err(Refusal::Sessions(2))
        );
        // An uncommitted reservation (the store refused) gives its slot back.
        peers.session_ended(a);
        drop(peers.admit_session(v4(1)).expect("a slot was freed"));
        assert_eq!(peers.held_by(v4(1)).2, 1);
        peers.admit_session(v4(1)).expect("third").commit(c);

        let ttl = Duration::from_secs(30);
        peers.session_detached(b, ttl);
        tokio::time::advance(Duration::from_secs(29)).await;
        peers.sweep();
        assert_eq!(peers.held_by(v4(1)).2, 2, "b may still be resumed");
        // Resumed here: no longer on a clock.
        peers.session_attached(b);
        tokio::time::advance(Duration::from_secs(60)).await;
        peers.sweep();
        assert_eq!(peers.held_by(v4(1)).2, 2);
        peers.session_detached(b, ttl);
        peers.session_detached(c, ttl);
        tokio::time::advance(ttl).await;
        peers.sweep();
        assert_eq!(peers.held_by(v4(1)), (0, 0, 0));
        assert_eq!(
            peers.addresses(),
            0,
            "an address that holds nothing is forgotten"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn new_sessions_are_rate_limited_by_a_token_bucket() {
        let peers = Arc::new(Peers::new(PeerLimits {
            sessions: None,
            ..limits()
        }));
        for _ in 0..3 {
            drop(peers.admit_session(v4(1)).expect("within the burst"));
        }
        let refused = peers.admit_session(v4(1)).map(drop);
        assert!(matches!(refused, Err(Refusal::SessionRate(_))));
        drop(
            peers
                .admit_session(v4(2))
                .expect("another address has its own bucket"),
        );
        // 10 a second: one token every 100 ms.
        tokio::time::advance(Duration::from_millis(100)).await;
        drop(peers.admit_session(v4(1)).expect("refilled"));
        assert!(peers.admit_session(v4(1)).is_err());
        // An idle bucket refills to its burst, not beyond, and the entry
        // is forgotten once full.
        tokio::time::advance(Duration::from_secs(10)).await;
        peers.sweep();
        assert_eq!(peers.addresses(), 0);
        for _ in 0..3 {
            drop(peers.admit_session(v4(1)).expect("a full burst again"));
        }
        assert!(peers.admit_session(v4(1)).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_takes_everything_and_keeps_no_holds() {
        let peers = Arc::new(Peers::new(PeerLimits::UNLIMITED));
        let tickets: Vec<_> = (0..1000)
            .map(|_| peers.admit_connection(v4(1)).expect("unlimited"))
            .collect();
        for n in 0..1000 {
            peers
                .admit_session(v4(1))
                .expect("unlimited")
                .commit(ClientId::from_u128(n + 1));
        }
        assert!(peers.holds.iter().all(|shard| lock(shard).is_empty()));
        drop(tickets);
        peers.sweep();
        assert_eq!(peers.addresses(), 0);
    }

    #[test]
    fn refusals_name_the_address_and_the_quota() {
        let frame = Refusal::Sessions(300).error_frame(v4(9));
        assert_eq!(frame.code, ErrorCode::ServerBusy);
        assert!(frame.message.contains("192.0.2.9"), "{}", frame.message);
        assert!(frame.message.contains("300 sessions"), "{}", frame.message);
        let frame = Refusal::SessionRate(DEFAULT_SESSION_RATE).error_frame(v4(9));
        assert!(frame.message.contains("50 a second"), "{}", frame.message);
    }
}
