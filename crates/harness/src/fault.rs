//! What a [`FaultProxy`](crate::proxy::FaultProxy) does to one connection
//! (a [`ConnectionPlan`]: latency, 1-byte writes, a fault and its trigger)
//! and, as a pure state machine ([`FaultState`]), when the fault strikes
//! and what each direction does then. The proxy only moves bytes and
//! timers; every decision is here, unit-tested without sockets.

use std::fmt;
use std::time::Duration;

use numstream_protocol::codec;
use numstream_protocol::frame::tag;

/// One direction of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Server → client.
    Downstream,
    /// Client → server.
    Upstream,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Downstream => "downstream",
            Self::Upstream => "upstream",
        })
    }
}

/// Which directions a stall freezes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StallDirections {
    Downstream,
    Upstream,
    Both,
}

impl StallDirections {
    pub fn covers(self, direction: Direction) -> bool {
        matches!(
            (self, direction),
            (Self::Both, _)
                | (Self::Downstream, Direction::Downstream)
                | (Self::Upstream, Direction::Upstream)
        )
    }
}

/// The peer a half-close is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The client gets FIN (it sees the server's stream end); what the
    /// client sends is still forwarded.
    Client,
    /// The server gets FIN (it sees the client hang up); what the server
    /// sends is still forwarded.
    Server,
}

/// When a fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Once exactly this many bytes went through in this direction (the
    /// proxy never forwards a byte past it before the fault).
    Bytes { direction: Direction, after: u64 },
    /// This long after the connection was accepted.
    After(Duration),
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bytes { direction, after } => write!(f, "after {after} {direction} bytes"),
            Self::After(delay) => write!(f, "after {} ms", delay.as_millis()),
        }
    }
}

/// The fault that ends (or cripples) a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Both sides get FIN.
    Close(Trigger),
    /// Both sides get RST (`SO_LINGER` 0, then close).
    Reset(Trigger),
    /// Forwarding stops in the given directions without closing anything,
    /// as when a path silently dies; the other direction keeps working.
    /// The proxy closes the connection `hold` after the stall began.
    Stall {
        at: Trigger,
        directions: StallDirections,
        hold: Duration,
    },
    /// One side gets FIN; the other direction keeps flowing until its own
    /// end, or `hold` after the half-close.
    HalfClose {
        at: Trigger,
        side: Side,
        hold: Duration,
    },
}

impl Fault {
    pub fn trigger(&self) -> Trigger {
        match *self {
            Self::Close(at) | Self::Reset(at) => at,
            Self::Stall { at, .. } | Self::HalfClose { at, .. } => at,
        }
    }

    /// The same fault, struck by another trigger.
    pub fn with_trigger(self, at: Trigger) -> Self {
        match self {
            Self::Close(_) => Self::Close(at),
            Self::Reset(_) => Self::Reset(at),
            Self::Stall {
                directions, hold, ..
            } => Self::Stall {
                at,
                directions,
                hold,
            },
            Self::HalfClose { side, hold, .. } => Self::HalfClose { at, side, hold },
        }
    }

    /// Short name for statistics.
    pub fn kind(&self) -> FaultKind {
        match self {
            Self::Close(_) => FaultKind::Close,
            Self::Reset(_) => FaultKind::Reset,
            Self::Stall { .. } => FaultKind::Stall,
            Self::HalfClose { .. } => FaultKind::HalfClose,
        }
    }
}

/// Whether a trigger can strike before the WELCOME is through: inside the
/// client's hello (a RESUME, the longest, is 41 bytes) or the WELCOME.
pub fn is_early(trigger: Trigger) -> bool {
    match trigger {
        Trigger::Bytes {
            direction: Direction::Upstream,
            after,
        } => after <= codec::RESUME_FRAME_LEN as u64,
        Trigger::Bytes {
            direction: Direction::Downstream,
            after,
        } => after < codec::WELCOME_FRAME_LEN as u64,
        Trigger::After(_) => false,
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Close(at) => write!(f, "close (FIN) {at}"),
            Self::Reset(at) => write!(f, "reset (RST) {at}"),
            Self::Stall {
                at,
                directions,
                hold,
            } => write!(
                f,
                "stall {} {at}, held {} ms",
                match directions {
                    StallDirections::Downstream => "downstream",
                    StallDirections::Upstream => "upstream",
                    StallDirections::Both => "both directions",
                },
                hold.as_millis()
            ),
            Self::HalfClose { at, side, hold } => write!(
                f,
                "half-close to the {} {at}, held {} ms",
                match side {
                    Side::Client => "client",
                    Side::Server => "server",
                },
                hold.as_millis()
            ),
        }
    }
}

/// Fault kinds, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    Close,
    Reset,
    Stall,
    HalfClose,
}

impl FaultKind {
    pub const ALL: [FaultKind; 4] = [Self::Close, Self::Reset, Self::Stall, Self::HalfClose];

    pub fn name(self) -> &'static str {
        match self {
            Self::Close => "close",
            Self::Reset => "reset",
            Self::Stall => "stall",
            Self::HalfClose => "half-close",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// [`FaultKind::parse`] with an error message, for command lines.
    pub fn parse_arg(name: &str) -> Result<Self, String> {
        Self::parse(name).ok_or_else(|| {
            format!("unknown fault {name:?}; one of: close, reset, stall, half-close")
        })
    }
}

/// Everything the proxy does to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectionPlan {
    /// Added to every chunk, in both directions (order is preserved).
    pub latency: Option<Duration>,
    /// Forward this direction one byte per write, so the receiver has to
    /// reassemble every frame from 1-byte reads.
    pub split: Option<Direction>,
    pub fault: Option<Fault>,
}

impl ConnectionPlan {
    pub const PASS: ConnectionPlan = ConnectionPlan {
        latency: None,
        split: None,
        fault: None,
    };

    /// Both sides get FIN once exactly `bytes` went through in `direction`.
    pub fn close_after(direction: Direction, bytes: u64) -> Self {
        Self {
            fault: Some(Fault::Close(Trigger::Bytes {
                direction,
                after: bytes,
            })),
            ..Self::PASS
        }
    }
}

impl fmt::Display for ConnectionPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(fault) = self.fault {
            parts.push(fault.to_string());
        }
        if let Some(latency) = self.latency {
            parts.push(format!("latency {} ms", latency.as_millis()));
        }
        if let Some(direction) = self.split {
            parts.push(format!("1-byte writes {direction}"));
        }
        if parts.is_empty() {
            f.write_str("pass")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

/// What one direction does once the fault has struck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaction {
    /// Keep forwarding.
    Continue,
    /// Stop forwarding; the connection is about to be closed or reset.
    Stop,
    /// Stop reading and writing, close nothing.
    Freeze,
    /// FIN to this direction's receiver; discard what its sender still sends.
    HalfClose,
}

/// How a connection's fault is struck: the bytes delivered so far in each
/// direction, whether the trigger point was reached (`hit`) and whether the
/// fault struck (`fired`; it may be held back after the hit, see
/// `protect_first_welcome`). Pure: the proxy reports what it delivered and
/// when the time trigger expired, and asks what to do.
#[derive(Debug, Clone)]
pub struct FaultState {
    plan: ConnectionPlan,
    protect_first_welcome: bool,
    delivered_up: u64,
    delivered_down: u64,
    /// The first client bytes, to tell an OPEN from a RESUME.
    hello: Vec<u8>,
    hit: bool,
    fired: bool,
}

/// Bytes of the client's first frame that tell its type: the length
/// prefix and the type byte.
const HELLO_BYTES: usize = codec::LENGTH_PREFIX_LEN + 1;

impl FaultState {
    /// A fresh connection under `plan`. With `protect_first_welcome`, a fault
    /// that would strike after a complete OPEN went up but before the whole
    /// WELCOME came down waits until the WELCOME is through: a lost first
    /// WELCOME orphans a session the client cannot resume.
    pub fn new(plan: ConnectionPlan, protect_first_welcome: bool) -> Self {
        Self {
            plan,
            protect_first_welcome,
            delivered_up: 0,
            delivered_down: 0,
            hello: Vec::with_capacity(HELLO_BYTES),
            hit: false,
            fired: false,
        }
    }

    pub fn plan(&self) -> &ConnectionPlan {
        &self.plan
    }

    /// The trigger point was reached (the fault may still be held back).
    pub fn is_hit(&self) -> bool {
        self.hit
    }

    /// The fault struck.
    pub fn is_fired(&self) -> bool {
        self.fired
    }

    /// The byte trigger of `direction` while it has not been reached: the
    /// total this direction may deliver before the fault. The proxy reads no
    /// byte past it.
    pub fn byte_trigger(&self, direction: Direction) -> Option<u64> {
        match self.plan.fault.map(|f| f.trigger()) {
            Some(Trigger::Bytes {
                direction: d,
                after,
            }) if d == direction && !self.hit => Some(after),
            _ => None,
        }
    }

    /// When the time trigger strikes, as time since the connection was
    /// accepted.
    pub fn time_trigger(&self) -> Option<Duration> {
        match self.plan.fault.map(|f| f.trigger()) {
            Some(Trigger::After(delay)) => Some(delay),
            _ => None,
        }
    }

    /// `bytes` were delivered in `direction`. Whether the fault struck just
    /// now.
    pub fn delivered(&mut self, direction: Direction, bytes: &[u8]) -> bool {
        let total = match direction {
            Direction::Upstream => {
                let room = HELLO_BYTES.saturating_sub(self.hello.len());
                self.hello
                    .extend_from_slice(&bytes[..room.min(bytes.len())]);
                self.delivered_up += bytes.len() as u64;
                self.delivered_up
            }
            Direction::Downstream => {
                self.delivered_down += bytes.len() as u64;
                self.delivered_down
            }
        };
        if self
            .byte_trigger(direction)
            .is_some_and(|after| total >= after)
        {
            self.hit = true;
        }
        self.maybe_fire()
    }

    /// The time trigger expired. Whether the fault struck just now.
    pub fn time_expired(&mut self) -> bool {
        self.hit = true;
        self.maybe_fire()
    }

    fn maybe_fire(&mut self) -> bool {
        if !self.hit || self.fired {
            return false;
        }
        if self.protect_first_welcome {
            let opening = self.hello.get(codec::LENGTH_PREFIX_LEN) == Some(&tag::OPEN);
            if opening
                && self.delivered_up >= codec::OPEN_FRAME_LEN as u64
                && self.delivered_down < codec::WELCOME_FRAME_LEN as u64
            {
                return false;
            }
        }
        self.fired = true;
        true
    }

    /// What `direction` does once the fault has struck.
    pub fn reaction(&self, direction: Direction) -> Reaction {
        match self.plan.fault {
            Some(Fault::Stall { directions, .. }) if directions.covers(direction) => {
                Reaction::Freeze
            }
            Some(Fault::HalfClose { side, .. }) => match (side, direction) {
                (Side::Client, Direction::Downstream) | (Side::Server, Direction::Upstream) => {
                    Reaction::HalfClose
                }
                _ => Reaction::Continue,
            },
            Some(Fault::Close(_) | Fault::Reset(_)) => Reaction::Stop,
            _ => Reaction::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(fault: Fault) -> ConnectionPlan {
        ConnectionPlan {
            fault: Some(fault),
            ..ConnectionPlan::PASS
        }
    }

    fn bytes_down(after: u64) -> Trigger {
        Trigger::Bytes {
            direction: Direction::Downstream,
            after,
        }
    }

    /// An OPEN's bytes as the client sends them (only the type byte and
    /// the length matter here).
    fn open_bytes() -> Vec<u8> {
        let mut open = vec![0u8; codec::OPEN_FRAME_LEN];
        open[codec::LENGTH_PREFIX_LEN] = tag::OPEN;
        open
    }

    #[test]
    fn a_byte_trigger_strikes_at_exactly_its_byte() {
        let mut state = FaultState::new(plan(Fault::Close(bytes_down(40))), false);
        assert_eq!(state.byte_trigger(Direction::Downstream), Some(40));
        assert_eq!(state.byte_trigger(Direction::Upstream), None);
        assert!(!state.delivered(Direction::Upstream, &[0; 100]));
        assert!(!state.delivered(Direction::Downstream, &[0; 39]));
        assert!(!state.is_hit());
        assert!(state.delivered(Direction::Downstream, &[0; 1]));
        assert!(state.is_hit() && state.is_fired());
        // Reached: no byte limit any more, and it strikes only once.
        assert_eq!(state.byte_trigger(Direction::Downstream), None);
        assert!(!state.delivered(Direction::Downstream, &[0; 1]));
    }

    #[test]
    fn a_time_trigger_strikes_when_it_expires() {
        let after = Duration::from_millis(50);
        let mut state = FaultState::new(plan(Fault::Reset(Trigger::After(after))), false);
        assert_eq!(state.time_trigger(), Some(after));
        assert_eq!(state.byte_trigger(Direction::Downstream), None);
        assert!(!state.delivered(Direction::Downstream, &[0; 1000]));
        assert!(state.time_expired());
        assert!(!state.time_expired(), "once");
    }

    #[test]
    fn without_a_fault_nothing_strikes() {
        let mut state = FaultState::new(ConnectionPlan::PASS, true);
        assert!(!state.delivered(Direction::Downstream, &[0; 10_000]));
        assert_eq!(state.time_trigger(), None);
        for direction in [Direction::Upstream, Direction::Downstream] {
            assert_eq!(state.reaction(direction), Reaction::Continue);
        }
    }

    #[test]
    fn a_protected_first_welcome_holds_the_fault_until_it_is_through() {
        let mut state = FaultState::new(plan(Fault::Close(bytes_down(3))), true);
        assert!(!state.delivered(Direction::Upstream, &open_bytes()));
        // Hit inside the WELCOME: held back...
        assert!(!state.delivered(Direction::Downstream, &[0; 3]));
        assert!(state.is_hit() && !state.is_fired());
        let rest = codec::WELCOME_FRAME_LEN - 4;
        assert!(!state.delivered(Direction::Downstream, &vec![0; rest]));
        // ...and struck once the last WELCOME byte is through.
        assert!(state.delivered(Direction::Downstream, &[0; 1]));
    }

    #[test]
    fn only_an_open_is_protected() {
        // A RESUME's session survives a lost WELCOME: no protection.
        let mut resume = vec![0u8; codec::RESUME_FRAME_LEN];
        resume[codec::LENGTH_PREFIX_LEN] = tag::RESUME;
        let mut state = FaultState::new(plan(Fault::Close(bytes_down(3))), true);
        assert!(!state.delivered(Direction::Upstream, &resume));
        assert!(state.delivered(Direction::Downstream, &[0; 3]));
        // Nor is anything while the OPEN is incomplete: the server has not
        // seen it, so no session exists yet.
        let mut state = FaultState::new(plan(Fault::Close(bytes_down(3))), true);
        assert!(!state.delivered(Direction::Upstream, &open_bytes()[..10]));
        assert!(state.delivered(Direction::Downstream, &[0; 3]));
    }

    #[test]
    fn each_fault_tells_each_direction_what_to_do() {
        let at = bytes_down(1);
        let hold = Duration::from_secs(1);
        let cases = [
            (Fault::Close(at), Reaction::Stop, Reaction::Stop),
            (Fault::Reset(at), Reaction::Stop, Reaction::Stop),
            (
                Fault::Stall {
                    at,
                    directions: StallDirections::Downstream,
                    hold,
                },
                Reaction::Continue,
                Reaction::Freeze,
            ),
            (
                Fault::Stall {
                    at,
                    directions: StallDirections::Both,
                    hold,
                },
                Reaction::Freeze,
                Reaction::Freeze,
            ),
            (
                Fault::HalfClose {
                    at,
                    side: Side::Client,
                    hold,
                },
                Reaction::Continue,
                Reaction::HalfClose,
            ),
            (
                Fault::HalfClose {
                    at,
                    side: Side::Server,
                    hold,
                },
                Reaction::HalfClose,
                Reaction::Continue,
            ),
        ];
        for (fault, up, down) in cases {
            let state = FaultState::new(plan(fault), false);
            assert_eq!(state.reaction(Direction::Upstream), up, "{fault}");
            assert_eq!(state.reaction(Direction::Downstream), down, "{fault}");
        }
    }
}
