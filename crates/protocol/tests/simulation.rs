//! Deterministic simulation of whole deployments: several servers driving
//! [`ServerSession`]s, one session store with latency, outages and expiry,
//! and clients driving [`SequenceReceiver`]s over links that delay, split,
//! cut at any byte and vanish, with takeovers, shutdowns and crashes, all
//! under simulated time and one seeded random generator (the style of
//! FoundationDB's and TigerBeetle's simulators, scaled to this protocol).
//!
//! Every step checks the properties the protocol promises (see
//! [`World::check`] and [`World::check_quiescent`]). A failing seed is
//! printed with the command that replays it alone, with a trace:
//!
//! ```text
//! NUMSTREAM_SIM_SEED=<seed> cargo test -p numstream-protocol --test simulation -- --nocapture
//! ```
//!
//! CI runs `NUMSTREAM_SIM_SEEDS` seeds (default 2,000) from
//! `NUMSTREAM_SIM_FIRST_SEED` (default 0); a soak run is the same test
//! with more seeds, in release mode (docs/testing.md, "Deterministic simulation").

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use chacha20::ChaCha8Rng;
use chacha20::rand_core::{Rng, SeedableRng};

use numstream_protocol::server::{
    AttachFailure, EndReason, Event, Grant, Hello, ServerSession, SessionConfig, Step,
    StoreFailure, new_grant,
};
use numstream_protocol::{
    ClientId, Disposition, ErrorCode, Frame, Progress, ResumeToken, SequenceChecksum,
    SequenceReceiver, SessionSeed, client_silence_timeout, decode_frame, encode_frame, number_at,
};

/// Bound on simulated time per seed: every wait in the protocol is
/// bounded, so a run that has not settled by then is hung.
const HORIZON: Duration = Duration::from_secs(3600);
/// Bound on events per seed, for the same reason.
const MAX_EVENTS: usize = 2_000_000;
/// The reference server's local takeover wait and dead-peer bound.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);
const DEAD_PEER: Duration = Duration::from_secs(10);

type Time = Duration;

struct Dice(ChaCha8Rng);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.0.next_u64() % n }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.below(high - low + 1))
    }
    fn pick<T: Copy>(&mut self, options: &[T]) -> T {
        options[self.below(options.len() as u64) as usize]
    }
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        self.0.fill_bytes(&mut out);
        out
    }
}

// ---------------------------------------------------------------- store

#[derive(Debug, Clone)]
struct Record {
    grant: Grant,
    attached: bool,
    deadline: Time,
}

#[derive(Debug, Clone)]
enum StoreOp {
    Create {
        client_id: ClientId,
        count: u16,
        seed: SessionSeed,
        token: ResumeToken,
    },
    Attach {
        client_id: ClientId,
        token: ResumeToken,
    },
    Renew {
        client_id: ClientId,
        generation: u64,
    },
    Detach {
        client_id: ClientId,
        generation: u64,
    },
    Complete {
        client_id: ClientId,
        generation: u64,
    },
}

#[derive(Debug, Clone)]
enum StoreReply {
    Attached(Result<Grant, StoreFailure>),
    Done(Result<(), StoreFailure>),
}

/// The shared store's model: generations fence every write, deadlines
/// decide expiry on access, and it can be down.
#[derive(Debug, Default)]
struct Store {
    records: HashMap<ClientId, Record>,
    /// Outage windows: operations executed inside one fail.
    outages: Vec<(Time, Time)>,
    /// Seed of the last session created per client id: the reference a
    /// client's numbers are checked against.
    created: HashMap<ClientId, (SessionSeed, u16)>,
}

impl Store {
    fn down(&self, now: Time) -> bool {
        self.outages
            .iter()
            .any(|(from, to)| (*from..*to).contains(&now))
    }

    fn live(&mut self, client_id: ClientId, now: Time) -> Result<&mut Record, StoreFailure> {
        let expired = match self.records.get(&client_id) {
            None => return Err(StoreFailure::NotFound),
            Some(record) => now >= record.deadline,
        };
        if expired {
            self.records.remove(&client_id);
            return Err(StoreFailure::Expired);
        }
        self.records
            .get_mut(&client_id)
            .ok_or(StoreFailure::NotFound)
    }

    fn apply(&mut self, op: &StoreOp, now: Time, ttl: Duration) -> StoreReply {
        if self.down(now) {
            let failure = StoreFailure::Unavailable("outage".into());
            return match op {
                StoreOp::Create { .. } | StoreOp::Attach { .. } => {
                    StoreReply::Attached(Err(failure))
                }
                _ => StoreReply::Done(Err(failure)),
            };
        }
        match op {
            StoreOp::Create {
                client_id,
                count,
                seed,
                token,
            } => {
                if let Some(record) = self.records.get(client_id)
                    && now < record.deadline
                {
                    return StoreReply::Attached(Err(StoreFailure::AlreadyExists));
                }
                let grant = new_grant(*client_id, *count, *seed, *token);
                self.created.insert(*client_id, (*seed, *count));
                self.records.insert(
                    *client_id,
                    Record {
                        grant: grant.clone(),
                        attached: true,
                        deadline: now + ttl,
                    },
                );
                StoreReply::Attached(Ok(grant))
            }
            StoreOp::Attach { client_id, token } => {
                StoreReply::Attached(self.live(*client_id, now).and_then(|record| {
                    if !record.grant.token.ct_eq(token) {
                        return Err(StoreFailure::BadToken);
                    }
                    record.grant.generation += 1;
                    record.attached = true;
                    record.deadline = now + ttl;
                    Ok(record.grant.clone())
                }))
            }
            StoreOp::Renew {
                client_id,
                generation,
            } => StoreReply::Done(self.live(*client_id, now).and_then(|record| {
                if record.grant.generation != *generation {
                    return Err(StoreFailure::Superseded);
                }
                record.deadline = now + ttl;
                Ok(())
            })),
            StoreOp::Detach {
                client_id,
                generation,
            } => StoreReply::Done(self.live(*client_id, now).and_then(|record| {
                if record.grant.generation != *generation {
                    return Err(StoreFailure::Superseded);
                }
                record.attached = false;
                record.deadline = now + ttl;
                Ok(())
            })),
            StoreOp::Complete {
                client_id,
                generation,
            } => {
                let current = self.live(*client_id, now).map(|r| r.grant.generation);
                StoreReply::Done(match current {
                    Ok(g) if g == *generation => {
                        self.records.remove(client_id);
                        Ok(())
                    }
                    Ok(_) => Err(StoreFailure::Superseded),
                    Err(error) => Err(error),
                })
            }
        }
    }
}

// ---------------------------------------------------------------- world

#[derive(Debug, Clone)]
enum Ev {
    /// Bytes reach one end of a link (`to_server` says which).
    Deliver {
        link: usize,
        to_server: bool,
        bytes: Vec<u8>,
    },
    /// The other end closed (FIN) or reset.
    Fin {
        link: usize,
        to_server: bool,
    },
    /// A connection's timer.
    ConnTimer {
        conn: usize,
        at: Instant,
    },
    /// The server notices a vanished peer.
    DeadPeer {
        link: usize,
    },
    StoreExec {
        op: usize,
    },
    StoreReply {
        op: usize,
    },
    ClaimTimeout {
        conn: usize,
    },
    Notice {
        server: usize,
        client_id: ClientId,
        generation: u64,
    },
    ClientTimer {
        client: usize,
        at: Time,
    },
    ClientConnect {
        client: usize,
    },
    Shutdown {
        server: usize,
    },
    Crash {
        server: usize,
    },
    Restart {
        server: usize,
    },
}

#[derive(Debug)]
struct Link {
    conn: Option<usize>,
    client: usize,
    /// Last delivery time per direction (`[to_server, to_client]`): TCP
    /// delivers in order.
    last: [Time; 2],
    sent: [usize; 2],
    /// Cut after this many bytes in that direction.
    cut_after: [Option<usize>; 2],
    vanish_at: Option<Time>,
    dead: bool,
    closed_by_client: bool,
    closed_by_server: bool,
    latency: (u64, u64),
    split: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum ConnPhase {
    Running,
    Ending(VecDeque<Step>),
    Closed,
}

struct Conn {
    server: usize,
    link: usize,
    session: ServerSession,
    phase: ConnPhase,
    timer_at: Option<Instant>,
    /// The registry entry this connection holds (client id, generation),
    /// and whether its claim guard is still held.
    claim: Option<(ClientId, u64)>,
    holds_claim: bool,
    /// Successors waiting for this connection to let go.
    waiters: Vec<usize>,
    waiting: bool,
    pending_store: Option<usize>,
    /// Why it ended, once it did.
    reason: Option<EndReason>,
    /// Whether the store failed a store step of its ending.
    store_step_failed: bool,
}

struct Server {
    up: bool,
    shutting_down: bool,
    registry: HashMap<ClientId, (u64, usize)>,
    conns: Vec<usize>,
    incarnation: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ClientResult {
    Verified,
    Failed(String),
}

struct Client {
    receiver: SequenceReceiver,
    link: Option<usize>,
    rx: BytesMut,
    timer: Option<Time>,
    welcomed_once: bool,
    away_since: Option<Time>,
    open_deadline: Time,
    attempts: u32,
    takeovers: u32,
    server_cursor: usize,
    result: Option<ClientResult>,
    /// Sends half an ACK after its first number (`1`) or a byte behind
    /// its first hello (`2`); `0` behaves.
    misbehaves: u8,
    misbehaved: bool,
    ttl: Duration,
    interval: Duration,
}

struct StoreCall {
    conn: Option<usize>,
    op: StoreOp,
    reply: Option<StoreReply>,
    latency: Duration,
    /// For a hello's attach: the client id, to publish a takeover notice.
    notify: bool,
}

struct Scenario {
    config: Arc<SessionConfig>,
    store_latency: (u64, u64),
    notice_loss: u64,
    link_faults: u64,
}

struct World {
    seed: u64,
    trace: bool,
    base: Instant,
    now: Time,
    dice: Dice,
    events: BinaryHeap<Reverse<(Time, u64, usize)>>,
    payloads: Vec<Option<Ev>>,
    sequence: u64,
    scenario: Scenario,
    store: Store,
    calls: Vec<StoreCall>,
    links: Vec<Link>,
    conns: Vec<Conn>,
    servers: Vec<Server>,
    clients: Vec<Client>,
    /// Per client id: when two servers started streaming it at once.
    overlap_since: HashMap<ClientId, Time>,
    /// Per client id: last time some connection held its session.
    last_held: HashMap<ClientId, Time>,
    stats: Stats,
    violations: Vec<String>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    verified: u32,
    failed: u32,
    takeovers: u32,
    cross_server_overlaps: u32,
    malformed_answers: u32,
    lease_stops: u32,
}

impl World {
    fn new(seed: u64, trace: bool) -> Self {
        let mut dice = Dice(ChaCha8Rng::seed_from_u64(seed));
        let calm = seed.is_multiple_of(10);
        let servers = 1 + dice.below(3) as usize;
        let interval = dice.pick(&[0, 0, 10, 200, 1000, 6000]);
        let ttl = Duration::from_millis(dice.pick(&[1500, 3000, 10_000, 30_000]));
        let config = Arc::new(SessionConfig {
            interval: Duration::from_millis(interval),
            session_ttl: ttl,
            handshake_timeout: Duration::from_secs(5),
            ack_wait: Duration::from_secs(dice.pick(&[1, 5, 120])) + DEAD_PEER,
            lease_renewal_period: (ttl / 3).max(Duration::from_millis(10)),
            store_shared: servers > 1 || dice.chance(50),
        });
        let scenario = Scenario {
            config: config.clone(),
            // A lease is renewed at a third of the TTL and must be confirmed
            // by two thirds, so a store slower than that (round trip above
            // TTL/3) stops every stream with `store_unavailable`: found by
            // this simulation, a limit of the design rather than a bug. Only
            // runs with faults try such a store (safety is still checked).
            store_latency: if !calm && dice.chance(5) {
                (1, 400)
            } else if dice.chance(30) {
                (1, (ttl.as_millis() as u64 / 12).min(400))
            } else {
                (0, 5)
            },
            notice_loss: if calm { 0 } else { dice.pick(&[0, 10, 100]) },
            link_faults: if calm { 0 } else { dice.pick(&[0, 10, 30, 60]) },
        };
        let mut world = World {
            seed,
            trace,
            base: Instant::now(),
            now: Duration::ZERO,
            dice,
            events: BinaryHeap::new(),
            payloads: Vec::new(),
            sequence: 0,
            scenario,
            store: Store::default(),
            calls: Vec::new(),
            links: Vec::new(),
            conns: Vec::new(),
            servers: (0..servers)
                .map(|_| Server {
                    up: true,
                    shutting_down: false,
                    registry: HashMap::new(),
                    conns: Vec::new(),
                    incarnation: 0,
                })
                .collect(),
            clients: Vec::new(),
            overlap_since: HashMap::new(),
            last_held: HashMap::new(),
            stats: Stats::default(),
            violations: Vec::new(),
        };
        let clients = 1 + world.dice.below(4) as usize;
        for index in 0..clients {
            let count = if interval == 0 && world.dice.chance(20) {
                1 + world.dice.below(2500) as u16
            } else {
                1 + world.dice.below(if interval >= 1000 { 8 } else { 40 }) as u16
            };
            let client_id = ClientId::from_u128(u128::from_be_bytes(world.dice.bytes()) | 1);
            let misbehaves = if !calm && world.dice.chance(6) {
                1 + world.dice.below(2) as u8
            } else {
                0
            };
            world.clients.push(Client {
                receiver: SequenceReceiver::new(
                    client_id,
                    NonZeroU16::new(count).expect("at least one number"),
                ),
                link: None,
                rx: BytesMut::new(),
                timer: None,
                welcomed_once: false,
                away_since: None,
                open_deadline: Duration::from_secs(60),
                attempts: 0,
                takeovers: 0,
                server_cursor: index,
                result: None,
                misbehaves,
                misbehaved: false,
                ttl,
                interval: config.interval,
            });
            let start = world.dice.millis(0, 500);
            world.schedule(start, Ev::ClientConnect { client: index });
        }
        if !calm {
            let run = ttl.max(Duration::from_secs(2));
            if world.dice.chance(25) {
                let from = world.dice.millis(0, run.as_millis() as u64 * 2);
                let length = world.dice.millis(50, ttl.as_millis() as u64 * 2);
                world.store.outages.push((from, from + length));
            }
            for server in 0..servers {
                if world.dice.chance(10) {
                    let at = world.dice.millis(10, run.as_millis() as u64 * 2);
                    world.schedule(at, Ev::Shutdown { server });
                } else if world.dice.chance(8) {
                    let at = world.dice.millis(10, run.as_millis() as u64 * 2);
                    world.schedule(at, Ev::Crash { server });
                }
            }
        }
        world
    }

    fn instant(&self, at: Time) -> Instant {
        self.base + at
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            println!("{:>10.3?} {}", self.now, what());
        }
    }

    fn schedule(&mut self, at: Time, event: Ev) {
        self.sequence += 1;
        self.payloads.push(Some(event));
        self.events
            .push(Reverse((at, self.sequence, self.payloads.len() - 1)));
    }

    fn run(&mut self) -> Result<(), String> {
        let mut handled = 0;
        while let Some(Reverse((at, _, index))) = self.events.pop() {
            let Some(event) = self.payloads[index].take() else {
                continue;
            };
            handled += 1;
            if at > HORIZON || handled > MAX_EVENTS {
                return Err(format!(
                    "did not settle: {handled} events, {at:?} simulated"
                ));
            }
            self.now = at;
            self.log(|| format!("{event:?}"));
            self.handle(event)?;
            self.check()?;
        }
        self.check_quiescent()
    }

    fn handle(&mut self, event: Ev) -> Result<(), String> {
        match event {
            Ev::Deliver {
                link,
                to_server,
                bytes,
            } => {
                if to_server {
                    if let Some(conn) = self.links[link].conn {
                        let now = self.instant(self.now);
                        if self.conns[conn].phase == ConnPhase::Running {
                            self.conns[conn].session.handle_bytes(now, &bytes);
                            self.drive(conn);
                        }
                    }
                } else {
                    self.client_bytes(self.links[link].client, link, &bytes)?;
                }
            }
            Ev::Fin { link, to_server } => {
                if to_server {
                    if let Some(conn) = self.links[link].conn {
                        let now = self.instant(self.now);
                        let reset = self.links[link].dead.then(|| "connection reset".to_owned());
                        self.conns[conn].session.handle_closed(now, reset);
                        self.drive(conn);
                    }
                } else {
                    let client = self.links[link].client;
                    if self.clients[client].link == Some(link) {
                        self.client_lost(client, "connection closed")?;
                    }
                }
            }
            Ev::DeadPeer { link } => {
                if let Some(conn) = self.links[link].conn {
                    let now = self.instant(self.now);
                    self.conns[conn]
                        .session
                        .handle_write_failed(now, "peer vanished".into());
                    self.drive(conn);
                }
            }
            Ev::ConnTimer { conn, at } => {
                if self.conns[conn].timer_at == Some(at) {
                    self.conns[conn].timer_at = None;
                    self.conns[conn].session.handle_timeout(at);
                    self.drive(conn);
                }
            }
            Ev::StoreExec { op } => {
                let ttl = self.scenario.config.session_ttl;
                let call = &self.calls[op];
                let reply = self.store.apply(&call.op.clone(), self.now, ttl);
                // Every write a connection asked for counts as holding the
                // session at the moment the store performs it.
                let client_id = match &call.op {
                    StoreOp::Create { client_id, .. }
                    | StoreOp::Attach { client_id, .. }
                    | StoreOp::Renew { client_id, .. }
                    | StoreOp::Detach { client_id, .. }
                    | StoreOp::Complete { client_id, .. } => *client_id,
                };
                self.last_held.insert(client_id, self.now);
                self.log(|| format!("store {:?} -> {reply:?}", self.calls[op].op));
                if let (true, StoreReply::Attached(Ok(grant))) = (call.notify, &reply)
                    && grant.generation > 1
                {
                    for server in 0..self.servers.len() {
                        if !self.dice.chance(self.scenario.notice_loss) {
                            let delay = self.dice.millis(0, 20);
                            let notice = Ev::Notice {
                                server,
                                client_id: grant.client_id,
                                generation: grant.generation,
                            };
                            self.schedule(self.now + delay, notice);
                        }
                    }
                }
                let latency = self.calls[op].latency;
                self.calls[op].reply = Some(reply);
                self.schedule(self.now + latency, Ev::StoreReply { op });
            }
            Ev::StoreReply { op } => self.store_reply(op),
            Ev::ClaimTimeout { conn } => {
                if self.conns[conn].waiting {
                    self.grant_claim(conn);
                }
            }
            Ev::Notice {
                server,
                client_id,
                generation,
            } => {
                if let Some(&(held, conn)) = self.servers[server].registry.get(&client_id)
                    && held < generation
                    && self.conns[conn].phase == ConnPhase::Running
                {
                    let now = self.instant(self.now);
                    self.conns[conn].session.handle_takeover(now);
                    self.drive(conn);
                }
            }
            Ev::ClientTimer { client, at } => {
                if self.clients[client].timer == Some(at) {
                    self.clients[client].timer = None;
                    self.client_timer(client)?;
                }
            }
            Ev::ClientConnect { client } => self.client_connect(client),
            Ev::Shutdown { server } => {
                self.servers[server].shutting_down = true;
                let now = self.instant(self.now);
                for conn in self.servers[server].conns.clone() {
                    self.conns[conn].session.handle_shutdown(now);
                    self.drive(conn);
                }
                let back = self.dice.millis(100, 3000);
                self.schedule(
                    self.now + Duration::from_secs(5) + back,
                    Ev::Restart { server },
                );
            }
            Ev::Crash { server } => {
                // Sockets reset; nothing is told to the store.
                for conn in self.servers[server].conns.clone() {
                    let link = self.conns[conn].link;
                    self.conns[conn].phase = ConnPhase::Closed;
                    self.conns[conn].timer_at = None;
                    self.links[link].conn = None;
                    self.release_claim(conn);
                    self.close_link_server_side(link);
                }
                self.servers[server].conns.clear();
                self.servers[server].registry.clear();
                self.servers[server].up = false;
                if !self.scenario.config.store_shared {
                    self.store.records.clear();
                }
                let back = self.dice.millis(100, 3000);
                self.schedule(self.now + back, Ev::Restart { server });
            }
            Ev::Restart { server } => {
                let state = &mut self.servers[server];
                if state.up && !state.shutting_down {
                    return Ok(());
                }
                // Stragglers of a drain past its grace are cut off.
                for conn in state.conns.clone() {
                    let link = self.conns[conn].link;
                    self.conns[conn].phase = ConnPhase::Closed;
                    self.links[link].conn = None;
                    self.release_claim(conn);
                    self.close_link_server_side(link);
                }
                let state = &mut self.servers[server];
                state.conns.clear();
                state.registry.clear();
                state.up = true;
                state.shutting_down = false;
                state.incarnation += 1;
                if !self.scenario.config.store_shared {
                    self.store.records.clear();
                }
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ server

    fn accept(&mut self, server: usize, link: usize) {
        let now = self.instant(self.now);
        let conn = self.conns.len();
        self.conns.push(Conn {
            server,
            link,
            session: ServerSession::new(self.scenario.config.clone(), now),
            phase: ConnPhase::Running,
            timer_at: None,
            claim: None,
            holds_claim: false,
            waiters: Vec::new(),
            waiting: false,
            pending_store: None,
            reason: None,
            store_step_failed: false,
        });
        self.servers[server].conns.push(conn);
        self.links[link].conn = Some(conn);
        if self.servers[server].shutting_down {
            self.conns[conn].session.handle_shutdown(now);
        }
        self.drive(conn);
    }

    /// What the glue does after every input: carry out events, write what
    /// is due, arm the one timer.
    fn drive(&mut self, conn: usize) {
        let now = self.instant(self.now);
        loop {
            let mut progressed = false;
            while let Some(event) = self.conns[conn].session.poll_event() {
                progressed = true;
                self.on_event(conn, event);
            }
            if self.conns[conn].phase != ConnPhase::Running {
                return;
            }
            let mut out = BytesMut::new();
            while self.conns[conn].session.poll_transmit(now, &mut out) > 0 {}
            if !out.is_empty() {
                progressed = true;
                let link = self.conns[conn].link;
                self.send(link, false, &out);
                self.conns[conn].session.handle_flushed(now);
            }
            if !progressed {
                break;
            }
        }
        let timer = self.conns[conn].session.poll_timeout();
        if timer != self.conns[conn].timer_at {
            self.conns[conn].timer_at = timer;
            if let Some(at) = timer {
                let at_time = at.saturating_duration_since(self.base).max(self.now);
                self.schedule(at_time, Ev::ConnTimer { conn, at });
            }
        }
    }

    fn on_event(&mut self, conn: usize, event: Event) {
        match event {
            Event::Admit(hello) => {
                let op = match hello {
                    Hello::Open(open) => StoreOp::Create {
                        client_id: open.client_id,
                        count: open.count,
                        seed: SessionSeed(self.dice.bytes()),
                        token: ResumeToken(self.dice.bytes()),
                    },
                    Hello::Resume(resume) => StoreOp::Attach {
                        client_id: resume.client_id,
                        token: resume.token,
                    },
                };
                self.call_store(Some(conn), op, true);
            }
            Event::Claim {
                client_id,
                generation,
            } => self.claim(conn, client_id, generation),
            Event::Renew {
                client_id,
                generation,
            } => {
                self.call_store(
                    Some(conn),
                    StoreOp::Renew {
                        client_id,
                        generation,
                    },
                    false,
                );
            }
            Event::Ended(ending) => {
                self.log(|| format!("conn {conn} ended: {:?}", ending.reason));
                match &ending.reason {
                    EndReason::TakenOver => self.stats.takeovers += 1,
                    EndReason::ClientViolation(_) => self.stats.malformed_answers += 1,
                    EndReason::LeaseUnconfirmed(_) => self.stats.lease_stops += 1,
                    _ => {}
                }
                // The glue forgets the registry entry as soon as streaming
                // stops; the claim guard goes with its step.
                if let Some((client_id, generation)) = self.conns[conn].claim {
                    let server = self.conns[conn].server;
                    if self.servers[server].registry.get(&client_id) == Some(&(generation, conn)) {
                        self.servers[server].registry.remove(&client_id);
                    }
                }
                self.conns[conn].timer_at = None;
                self.conns[conn].reason = Some(ending.reason.clone());
                self.conns[conn].phase = ConnPhase::Ending(ending.steps.into());
                self.advance_ending(conn);
            }
        }
    }

    fn call_store(&mut self, conn: Option<usize>, op: StoreOp, notify: bool) {
        let (low, high) = self.scenario.store_latency;
        let there = self.dice.millis(low, high);
        let back = self.dice.millis(low, high);
        self.calls.push(StoreCall {
            conn,
            op,
            reply: None,
            latency: back,
            notify,
        });
        let id = self.calls.len() - 1;
        if let Some(conn) = conn {
            self.conns[conn].pending_store = Some(id);
        }
        self.schedule(self.now + there, Ev::StoreExec { op: id });
    }

    fn store_reply(&mut self, op: usize) {
        let Some(conn) = self.calls[op].conn else {
            return;
        };
        if self.conns[conn].pending_store != Some(op) {
            return;
        }
        self.conns[conn].pending_store = None;
        let Some(reply) = self.calls[op].reply.take() else {
            return;
        };
        let now = self.instant(self.now);
        match &self.conns[conn].phase {
            ConnPhase::Running => {
                match reply {
                    StoreReply::Attached(result) => {
                        let result = result.map_err(AttachFailure::Store);
                        self.conns[conn].session.handle_attach(now, result);
                    }
                    StoreReply::Done(result) => {
                        self.conns[conn].session.handle_renewal(now, result);
                    }
                }
                self.drive(conn);
            }
            // An ending's store step finished: on to the next step.
            ConnPhase::Ending(_) => {
                if matches!(reply, StoreReply::Done(Err(StoreFailure::Unavailable(_)))) {
                    self.conns[conn].store_step_failed = true;
                }
                self.advance_ending(conn);
            }
            ConnPhase::Closed => {}
        }
    }

    fn claim(&mut self, conn: usize, client_id: ClientId, generation: u64) {
        let server = self.conns[conn].server;
        let existing = self.servers[server].registry.get(&client_id).copied();
        if let Some((held, _)) = existing
            && held > generation
        {
            let now = self.instant(self.now);
            self.conns[conn].session.handle_claim(now, false);
            return;
        }
        self.servers[server]
            .registry
            .insert(client_id, (generation, conn));
        self.conns[conn].claim = Some((client_id, generation));
        self.conns[conn].holds_claim = true;
        match existing {
            Some((_, older)) if self.conns[older].holds_claim => {
                self.conns[conn].waiting = true;
                self.conns[older].waiters.push(conn);
                self.schedule(self.now + HANDOVER_WAIT, Ev::ClaimTimeout { conn });
                let now = self.instant(self.now);
                self.conns[older].session.handle_takeover(now);
                self.drive(older);
            }
            _ => self.grant_claim(conn),
        }
    }

    fn grant_claim(&mut self, conn: usize) {
        self.conns[conn].waiting = false;
        if self.conns[conn].phase != ConnPhase::Running {
            return;
        }
        let now = self.instant(self.now);
        self.conns[conn].session.handle_claim(now, true);
        self.drive(conn);
    }

    fn release_claim(&mut self, conn: usize) {
        if !self.conns[conn].holds_claim {
            return;
        }
        self.conns[conn].holds_claim = false;
        for waiter in std::mem::take(&mut self.conns[conn].waiters) {
            if self.conns[waiter].waiting {
                self.grant_claim(waiter);
            }
        }
    }

    fn advance_ending(&mut self, conn: usize) {
        loop {
            let ConnPhase::Ending(steps) = &mut self.conns[conn].phase else {
                return;
            };
            let Some(step) = steps.pop_front() else {
                self.close_conn(conn);
                return;
            };
            let link = self.conns[conn].link;
            match step {
                Step::Detach | Step::Complete => {
                    let Some(grant) = self.conns[conn].session.grant().cloned() else {
                        continue;
                    };
                    let (client_id, generation) = (grant.client_id, grant.generation);
                    let op = if step == Step::Detach {
                        StoreOp::Detach {
                            client_id,
                            generation,
                        }
                    } else {
                        StoreOp::Complete {
                            client_id,
                            generation,
                        }
                    };
                    self.call_store(Some(conn), op, false);
                    return;
                }
                Step::Send(error) => {
                    let mut out = BytesMut::new();
                    encode_frame(&Frame::Error(error), &mut out);
                    self.send(link, false, &out);
                }
                Step::ReleaseClaim => self.release_claim(conn),
                Step::Linger => self.close_link_server_side(link),
            }
        }
    }

    fn close_conn(&mut self, conn: usize) {
        self.check_detached(conn);
        let link = self.conns[conn].link;
        self.conns[conn].phase = ConnPhase::Closed;
        self.release_claim(conn);
        self.close_link_server_side(link);
        self.links[link].conn = None;
        let server = self.conns[conn].server;
        self.servers[server].conns.retain(|c| *c != conn);
    }

    // ------------------------------------------------------------ links

    fn open_link(&mut self, client: usize) -> usize {
        let faults = self.scenario.link_faults;
        let mut cut_after = [None, None];
        let mut vanish_at = None;
        if self.dice.chance(faults) {
            match self.dice.below(3) {
                0 => cut_after[0] = Some(self.dice.below(60) as usize),
                1 => cut_after[1] = Some(self.dice.below(400) as usize),
                _ => vanish_at = Some(self.now + self.dice.millis(0, 8000)),
            }
        }
        let latency = if self.dice.chance(20) {
            (1, 300)
        } else {
            (0, 2)
        };
        let split = self.dice.chance(50);
        self.links.push(Link {
            conn: None,
            client,
            last: [self.now; 2],
            sent: [0; 2],
            cut_after,
            vanish_at,
            dead: false,
            closed_by_client: false,
            closed_by_server: false,
            latency,
            split,
        });
        self.links.len() - 1
    }

    /// Sends bytes one way, in order, split at random points, cut at the
    /// link's fault byte.
    fn send(&mut self, link: usize, to_server: bool, bytes: &[u8]) {
        let direction = usize::from(!to_server);
        let state = &self.links[link];
        if state.dead
            || (to_server && state.closed_by_client)
            || (!to_server && state.closed_by_server)
            || state.vanish_at.is_some_and(|at| self.now >= at)
        {
            return;
        }
        let mut bytes = bytes.to_vec();
        let mut cut = false;
        if let Some(limit) = state.cut_after[direction]
            && state.sent[direction] + bytes.len() >= limit
        {
            bytes.truncate(limit.saturating_sub(state.sent[direction]));
            cut = true;
        }
        let (low, high) = state.latency;
        let split = state.split;
        self.links[link].sent[direction] += bytes.len();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let take = if split {
                1 + self.dice.below(rest.len() as u64) as usize
            } else {
                rest.len()
            };
            let at = (self.now + self.dice.millis(low, high)).max(self.links[link].last[direction]);
            self.links[link].last[direction] = at;
            let chunk = rest[..take].to_vec();
            self.schedule(
                at,
                Ev::Deliver {
                    link,
                    to_server,
                    bytes: chunk,
                },
            );
            rest = &rest[take..];
        }
        if cut {
            self.links[link].dead = true;
            let at = self.links[link]
                .last
                .iter()
                .copied()
                .max()
                .unwrap_or(self.now);
            self.schedule(
                at,
                Ev::Fin {
                    link,
                    to_server: true,
                },
            );
            self.schedule(
                at,
                Ev::Fin {
                    link,
                    to_server: false,
                },
            );
        }
    }

    fn close_link_server_side(&mut self, link: usize) {
        if self.links[link].closed_by_server {
            return;
        }
        self.links[link].closed_by_server = true;
        if self.links[link].dead || self.links[link].vanish_at.is_some_and(|at| self.now >= at) {
            return;
        }
        let at = self.links[link].last[1].max(self.now);
        self.schedule(
            at,
            Ev::Fin {
                link,
                to_server: false,
            },
        );
    }

    fn close_link_client_side(&mut self, link: usize) {
        if self.links[link].closed_by_client {
            return;
        }
        self.links[link].closed_by_client = true;
        if self.links[link].dead || self.links[link].vanish_at.is_some_and(|at| self.now >= at) {
            if self.links[link].vanish_at.is_some() {
                self.schedule(self.now + DEAD_PEER, Ev::DeadPeer { link });
            }
            return;
        }
        let at = self.links[link].last[0].max(self.now);
        self.schedule(
            at,
            Ev::Fin {
                link,
                to_server: true,
            },
        );
    }

    // ------------------------------------------------------------ clients

    fn client_connect(&mut self, client: usize) {
        if self.clients[client].result.is_some() {
            return;
        }
        let servers = self.servers.len();
        let server = self.clients[client].server_cursor % servers;
        self.clients[client].server_cursor += 1;
        self.clients[client].attempts += 1;
        if !self.servers[server].up {
            // Connection refused: try again after a backoff.
            return self.client_retry(client, true);
        }
        let link = self.open_link(client);
        if let Some(at) = self.links[link].vanish_at {
            self.schedule(at + DEAD_PEER, Ev::DeadPeer { link });
        }
        self.clients[client].link = Some(link);
        self.clients[client].rx.clear();
        self.accept(server, link);
        let hello = self.clients[client].receiver.hello();
        let mut out = BytesMut::new();
        encode_frame(&hello, &mut out);
        if self.clients[client].misbehaves == 2 && !self.clients[client].misbehaved {
            self.clients[client].misbehaved = true;
            out.extend_from_slice(&[0]);
        }
        self.send(link, true, &out);
        self.arm_client_timer(client, Duration::from_secs(5));
    }

    fn arm_client_timer(&mut self, client: usize, after: Duration) {
        let at = self.now + after;
        self.clients[client].timer = Some(at);
        self.schedule(at, Ev::ClientTimer { client, at });
    }

    fn client_timer(&mut self, client: usize) -> Result<(), String> {
        if self.clients[client].link.is_some() {
            return self.client_lost(client, "silence");
        }
        Ok(())
    }

    fn client_bytes(&mut self, client: usize, link: usize, bytes: &[u8]) -> Result<(), String> {
        if self.clients[client].link != Some(link) || self.clients[client].result.is_some() {
            return Ok(());
        }
        self.clients[client].rx.extend_from_slice(bytes);
        loop {
            let frame = match decode_frame(&mut self.clients[client].rx) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(error) => {
                    return Err(format!(
                        "client {client} got bytes it cannot decode: {error}"
                    ));
                }
            };
            let accepted = self.clients[client].receiver.accept(frame);
            let silence = client_silence_timeout(self.clients[client].interval);
            match accepted {
                Err(violation) => {
                    return Err(format!(
                        "client {client}: the server broke the protocol: {violation}"
                    ));
                }
                Ok(Progress::Welcomed(_)) => {
                    self.clients[client].welcomed_once = true;
                    self.clients[client].away_since = None;
                    self.arm_client_timer(client, silence);
                }
                Ok(Progress::Number { index, value }) => {
                    self.check_number(client, index, value)?;
                    self.arm_client_timer(client, silence);
                    if self.clients[client].misbehaves == 1 && !self.clients[client].misbehaved {
                        self.clients[client].misbehaved = true;
                        // Half an ACK, early: never acceptable.
                        self.send(link, true, &[0, 0, 0, 5, 3]);
                    }
                }
                Ok(Progress::Heartbeat) => self.arm_client_timer(client, silence),
                Ok(Progress::Completed(outcome)) => {
                    let count = self.clients[client].receiver.count();
                    let index = count - 1;
                    let client_id = self.clients[client].receiver.client_id();
                    let reference = self.reference(client_id)?;
                    let value = number_at(&reference.0, index);
                    let expected = SequenceChecksum::of_session(&reference.0, count);
                    if outcome.verified()
                        && (outcome.client_checksum != expected.checksum()
                            || outcome.sum != expected.sum())
                    {
                        return Err(format!(
                            "client {client} reported OK, but its sequence differs from the reference"
                        ));
                    }
                    if !outcome.verified() {
                        return Err(format!("client {client}: FINAL checksum does not verify"));
                    }
                    let _ = value;
                    let ack = self.clients[client].receiver.ack();
                    let mut out = BytesMut::new();
                    encode_frame(&ack, &mut out);
                    self.send(link, true, &out);
                    self.close_link_client_side(link);
                    self.finish(client, ClientResult::Verified);
                    return Ok(());
                }
                Ok(Progress::ServerError(error)) => {
                    self.log(|| format!("client {client} got {error}"));
                    self.close_link_client_side(link);
                    self.clients[client].link = None;
                    self.clients[client].timer = None;
                    if error.code == ErrorCode::TakenOver {
                        self.clients[client].takeovers += 1;
                        if self.clients[client].takeovers > 2 {
                            self.finish(
                                client,
                                ClientResult::Failed("taken over too often".into()),
                            );
                            return Ok(());
                        }
                        self.client_retry(client, true);
                        return Ok(());
                    }
                    match error.disposition {
                        Disposition::Final => {
                            self.finish(client, ClientResult::Failed(error.code.to_string()));
                        }
                        Disposition::Retry => self.client_retry(client, true),
                        Disposition::RetryNow => self.client_retry(client, false),
                    }
                    return Ok(());
                }
            }
        }
    }

    fn reference(&self, client_id: ClientId) -> Result<(SessionSeed, u16), String> {
        self.store
            .created
            .get(&client_id)
            .cloned()
            .ok_or_else(|| format!("no session was ever created for {client_id}"))
    }

    /// Property: a client never accepts a wrong number.
    fn check_number(&mut self, client: usize, index: u16, value: u32) -> Result<(), String> {
        let client_id = self.clients[client].receiver.client_id();
        let (seed, count) = self.reference(client_id)?;
        if count != self.clients[client].receiver.count() || number_at(&seed, index) != value {
            return Err(format!(
                "client {client} accepted a wrong number at index {index}"
            ));
        }
        Ok(())
    }

    fn client_lost(&mut self, client: usize, why: &str) -> Result<(), String> {
        self.log(|| format!("client {client} lost its connection: {why}"));
        if let Some(link) = self.clients[client].link.take() {
            self.close_link_client_side(link);
        }
        self.clients[client].timer = None;
        if self.clients[client].welcomed_once && self.clients[client].away_since.is_none() {
            self.clients[client].away_since = Some(self.now);
        }
        self.client_retry(client, true);
        Ok(())
    }

    fn client_retry(&mut self, client: usize, backoff: bool) {
        let state = &self.clients[client];
        if state.result.is_some() {
            return;
        }
        if let Some(away) = state.away_since
            && self.now.saturating_sub(away) >= state.ttl
        {
            return self.finish(
                client,
                ClientResult::Failed("away longer than the TTL".into()),
            );
        }
        if !state.welcomed_once && self.now >= state.open_deadline {
            return self.finish(client, ClientResult::Failed("open timeout".into()));
        }
        let ceiling = 100u64.saturating_mul(1 << state.attempts.min(6)).min(5000);
        let delay = if backoff {
            self.dice.millis(0, ceiling)
        } else {
            Duration::ZERO
        };
        self.schedule(self.now + delay, Ev::ClientConnect { client });
    }

    fn finish(&mut self, client: usize, result: ClientResult) {
        self.log(|| format!("client {client} finished: {result:?}"));
        match result {
            ClientResult::Verified => self.stats.verified += 1,
            ClientResult::Failed(_) => self.stats.failed += 1,
        }
        self.clients[client].result = Some(result);
        self.clients[client].timer = None;
        if let Some(link) = self.clients[client].link.take() {
            self.close_link_client_side(link);
        }
    }

    // ------------------------------------------------------------ properties

    /// Property: a connection that lost its client keeps the session for a
    /// resume (PROTOCOL.md 5.1, 5.3): once its ending is carried out, the
    /// session is detached, unless a newer connection owns it or the store
    /// could not be reached.
    fn check_detached(&mut self, conn: usize) {
        let state = &self.conns[conn];
        let keeps = matches!(
            state.reason,
            Some(
                EndReason::Disconnected(_)
                    | EndReason::ClientViolation(_)
                    | EndReason::Shutdown
                    | EndReason::LeaseUnconfirmed(_)
                    | EndReason::ResumeIndexOutOfRange
            )
        );
        let Some(grant) = state.session.grant() else {
            return;
        };
        if !keeps || state.store_step_failed || self.store.down(self.now) {
            return;
        }
        if let Some(record) = self.store.records.get(&grant.client_id)
            && record.grant.generation == grant.generation
            && record.attached
        {
            self.violations.push(format!(
                "connection {conn} ended ({:?}) without detaching {}",
                state.reason, grant.client_id
            ));
        }
    }

    /// Checked after every event.
    fn check(&mut self) -> Result<(), String> {
        if let Some(violation) = self.violations.pop() {
            return Err(violation);
        }
        let config = &self.scenario.config;
        // At most one streaming machine per session and server, always;
        // across servers only for a bounded overlap.
        let mut streaming: HashMap<ClientId, Vec<(usize, u64)>> = HashMap::new();
        for conn in self.servers.iter().flat_map(|s| s.conns.iter()) {
            let state = &self.conns[*conn];
            if state.phase == ConnPhase::Running
                && state.session.is_streaming()
                && let Some(grant) = state.session.grant()
            {
                streaming
                    .entry(grant.client_id)
                    .or_default()
                    .push((state.server, grant.generation));
            }
        }
        for (client_id, holders) in &streaming {
            self.last_held.insert(*client_id, self.now);
            let mut servers: Vec<usize> = holders.iter().map(|(s, _)| *s).collect();
            servers.sort_unstable();
            servers.dedup();
            if servers.len() != holders.len() {
                return Err(format!("two connections of one server stream {client_id}"));
            }
            if holders.len() > 1 {
                let since = *self.overlap_since.entry(*client_id).or_insert_with(|| {
                    self.stats.cross_server_overlaps += 1;
                    self.now
                });
                let (low, high) = self.scenario.store_latency;
                let _ = low;
                let bound = config.session_ttl - config.session_ttl / 3
                    + config.lease_renewal_period
                    + Duration::from_millis(2 * high + 50);
                if self.now - since > bound {
                    return Err(format!(
                        "{client_id} streamed on {} servers for {:?} (bound {bound:?})",
                        holders.len(),
                        self.now - since
                    ));
                }
            } else {
                self.overlap_since.remove(client_id);
            }
        }
        self.overlap_since
            .retain(|id, _| streaming.get(id).is_some_and(|h| h.len() > 1));
        // No session outlives its TTL without a connection: a record no
        // live connection holds may not be kept past the last moment one
        // held it, plus the TTL, plus the store's latency.
        let (_, high) = self.scenario.store_latency;
        let slack = Duration::from_millis(2 * high + 1);
        for (client_id, record) in &self.store.records {
            let held = self
                .servers
                .iter()
                .flat_map(|s| s.conns.iter())
                .any(|conn| {
                    let state = &self.conns[*conn];
                    state
                        .session
                        .grant()
                        .is_some_and(|g| g.client_id == *client_id)
                });
            if held {
                self.last_held.insert(*client_id, self.now);
                continue;
            }
            let last = self
                .last_held
                .get(client_id)
                .copied()
                .unwrap_or(Duration::ZERO);
            if record.deadline > last + config.session_ttl + slack {
                return Err(format!(
                    "{client_id} is kept until {:?}, but no connection held it after {last:?}",
                    record.deadline
                ));
            }
        }
        Ok(())
    }

    /// Checked once nothing is left to happen.
    fn check_quiescent(&mut self) -> Result<(), String> {
        for (index, client) in self.clients.iter().enumerate() {
            if client.result.is_none() {
                return Err(format!("client {index} never finished"));
            }
        }
        for (index, server) in self.servers.iter().enumerate() {
            if !server.conns.is_empty() || !server.registry.is_empty() {
                return Err(format!(
                    "server {index} leaks {} connections and {} registry entries",
                    server.conns.len(),
                    server.registry.len()
                ));
            }
        }
        for (index, conn) in self.conns.iter().enumerate() {
            if conn.phase != ConnPhase::Closed || conn.holds_claim {
                return Err(format!("connection {index} never closed"));
            }
        }
        // What the store still holds must expire on its own, within a TTL
        // of the last event (each step checked it against its holders).
        let (_, high) = self.scenario.store_latency;
        let limit =
            self.now + self.scenario.config.session_ttl + Duration::from_millis(2 * high + 1);
        for (client_id, record) in &self.store.records {
            if record.deadline > limit {
                return Err(format!(
                    "{client_id} outlives every connection in the store"
                ));
            }
        }
        let calm = self.seed.is_multiple_of(10);
        if calm && self.stats.verified as usize != self.clients.len() {
            return Err(format!(
                "a run without faults left clients unverified: {:?}",
                self.clients.iter().map(|c| &c.result).collect::<Vec<_>>()
            ));
        }
        Ok(())
    }
}

impl Stats {
    fn add(&mut self, other: Stats) {
        self.verified += other.verified;
        self.failed += other.failed;
        self.takeovers += other.takeovers;
        self.cross_server_overlaps += other.cross_server_overlaps;
        self.malformed_answers += other.malformed_answers;
        self.lease_stops += other.lease_stops;
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, got {value:?}")),
        Err(_) => default,
    }
}

fn run_seed(seed: u64, trace: bool) -> Result<Stats, String> {
    let mut world = World::new(seed, trace);
    let started = Instant::now();
    world.run()?;
    if std::env::var("NUMSTREAM_SIM_SLOW").is_ok() && started.elapsed() > Duration::from_millis(30)
    {
        println!(
            "seed {seed}: {:?}, {} events, {} conns",
            started.elapsed(),
            world.sequence,
            world.conns.len()
        );
    }
    Ok(world.stats)
}

#[test]
fn simulated_deployments_keep_every_promise() {
    if let Ok(seed) = std::env::var("NUMSTREAM_SIM_SEED") {
        let seed: u64 = seed
            .parse()
            .expect("NUMSTREAM_SIM_SEED must be a whole number");
        match run_seed(seed, true) {
            Ok(stats) => println!("seed {seed}: {stats:?}"),
            Err(failure) => panic!("seed {seed}: {failure}"),
        }
        return;
    }
    let first = env_u64("NUMSTREAM_SIM_FIRST_SEED", 0);
    let seeds = env_u64("NUMSTREAM_SIM_SEEDS", 2000);
    // Seeds are independent: one thread per core, each taking every n-th.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let outcomes: Vec<(Stats, Option<(u64, String)>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|worker| {
                scope.spawn(move || {
                    let mut total = Stats::default();
                    let mut seed = first + worker;
                    while seed < first + seeds {
                        match run_seed(seed, false) {
                            Ok(stats) => total.add(stats),
                            Err(failure) => return (total, Some((seed, failure))),
                        }
                        seed += threads;
                    }
                    (total, None)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("a simulation thread panicked"))
            .collect()
    });
    let mut total = Stats::default();
    let mut failures = Vec::new();
    for (stats, failure) in outcomes {
        total.add(stats);
        failures.extend(failure);
    }
    if let Some((seed, failure)) = failures.into_iter().min_by_key(|(seed, _)| *seed) {
        panic!(
            "seed {seed} failed: {failure}\nreplay it with a trace:\n  \
             NUMSTREAM_SIM_SEED={seed} cargo test -p numstream-protocol --test simulation -- --nocapture"
        );
    }
    println!("{seeds} seeds from {first}: {total:?}");
    // The faults must actually be exercised, or the properties are vacuous.
    assert!(total.verified > 0, "{total:?}");
    if seeds >= 500 {
        assert!(
            total.failed > 0 && total.takeovers > 0 && total.malformed_answers > 0,
            "{total:?}"
        );
    }
}
