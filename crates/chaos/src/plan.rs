//! What the proxy does to each connection: a [`ConnectionPlan`] drawn from a
//! seeded [`Schedule`].
//!
//! A plan is a pure function of `(seed, stream, ordinal)`: the seed of the
//! run, the stream (one client's path through one proxy) and the ordinal of
//! the connection on that stream. So a failing run replays from its seed:
//! every client's first connection gets the same fault again, its second
//! connection the same second fault, and so on. Byte-triggered faults hit
//! the same byte on replay; time-triggered ones hit the same moment, which
//! on a loaded machine may be a slightly different byte.

use std::time::Duration;

use chacha20::ChaCha8Rng;
use numstream_protocol::codec;
use rand::{RngExt, SeedableRng};

pub use numstream_harness::fault::{
    ConnectionPlan, Direction, Fault, FaultKind, Side, StallDirections, Trigger, is_early,
};
pub use numstream_harness::proxy::Planner;

/// Encoded frame lengths, as byte counts on the proxied streams.
pub const OPEN_LEN: u64 = codec::OPEN_FRAME_LEN as u64;
pub const WELCOME_LEN: u64 = codec::WELCOME_FRAME_LEN as u64;
pub const NUMBER_LEN: u64 = codec::NUMBER_FRAME_LEN as u64;
pub const RESUME_LEN: u64 = codec::RESUME_FRAME_LEN as u64;
/// Wire type byte of OPEN (offset 4 of the first client frame).
pub const OPEN_TYPE: u8 = numstream_protocol::frame::tag::OPEN;

/// How likely and how violent faults are. The same profile and seed always
/// give the same plans.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultProfile {
    /// Chance that one of the first `max_faults` connections gets a fault.
    pub fault_probability: f64,
    /// Connections from this ordinal on pass without a fault (they may
    /// still get latency or 1-byte writes), so every stream can finish.
    pub max_faults: u32,
    /// Fault kinds to draw from, equally likely.
    pub kinds: Vec<FaultKind>,
    /// Byte triggers are drawn from `1..=max_trigger_bytes`.
    pub max_trigger_bytes: u64,
    /// Time triggers are drawn from `min_trigger_time..=max_trigger_time`.
    pub min_trigger_time: Duration,
    pub max_trigger_time: Duration,
    /// How long a stalled or half-closed connection is held open.
    pub hold: Duration,
    pub latency_probability: f64,
    pub max_latency: Duration,
    pub split_probability: f64,
    /// Hold back any fault that would strike after a complete OPEN reached
    /// the server but before its WELCOME reached the client, until the
    /// WELCOME is through. Off by default: a lost first WELCOME leaves an
    /// orphaned session the client cannot resume, and the client must wait
    /// for it to expire (`session_exists`, about one session TTL) before its
    /// OPEN succeeds. Turning this on makes runs faster, not more lenient.
    pub protect_first_welcome: bool,
}

impl Default for FaultProfile {
    fn default() -> Self {
        Self {
            fault_probability: 0.6,
            max_faults: 4,
            kinds: FaultKind::ALL.to_vec(),
            max_trigger_bytes: 2_000,
            min_trigger_time: Duration::from_millis(50),
            max_trigger_time: Duration::from_secs(2),
            hold: Duration::from_secs(15),
            latency_probability: 0.2,
            max_latency: Duration::from_millis(30),
            split_probability: 0.15,
            protect_first_welcome: false,
        }
    }
}

/// The randomness of draw `ordinal` on `stream` of a run with `seed`, for
/// one purpose (`domain`): independent of every other draw, and the same on
/// every replay.
pub(crate) fn seeded_rng(seed: u64, stream: u64, ordinal: u64, domain: &[u8; 8]) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&stream.to_le_bytes());
    key[16..24].copy_from_slice(&ordinal.to_le_bytes());
    key[24..].copy_from_slice(domain);
    ChaCha8Rng::from_seed(key)
}

/// The plans of one stream: connection `n` on it gets `plan(n)`.
#[derive(Debug, Clone)]
pub struct Schedule {
    seed: u64,
    stream: u64,
    profile: FaultProfile,
    /// Plans given by hand (tests, manual experiments) instead of drawn.
    fixed: Option<std::sync::Arc<Vec<ConnectionPlan>>>,
}

impl Planner for Schedule {
    fn plan(&self, ordinal: u64) -> ConnectionPlan {
        Schedule::plan(self, ordinal)
    }

    fn stream(&self) -> u64 {
        self.stream
    }

    fn protect_first_welcome(&self) -> bool {
        self.profile.protect_first_welcome
    }
}

impl Schedule {
    pub fn new(seed: u64, stream: u64, profile: FaultProfile) -> Self {
        Self {
            seed,
            stream,
            profile,
            fixed: None,
        }
    }

    /// Connection `n` gets `plans[n]`; connections past the list pass.
    pub fn fixed(plans: Vec<ConnectionPlan>) -> Self {
        Self {
            fixed: Some(std::sync::Arc::new(plans)),
            ..Self::pass()
        }
    }

    /// Whether the proxy holds back faults between a complete OPEN and its
    /// WELCOME (see [`FaultProfile::protect_first_welcome`]).
    pub fn with_welcome_protection(mut self, protect: bool) -> Self {
        self.profile.protect_first_welcome = protect;
        self
    }

    /// A schedule that never interferes.
    pub fn pass() -> Self {
        Self::new(
            0,
            0,
            FaultProfile {
                fault_probability: 0.0,
                max_faults: 0,
                latency_probability: 0.0,
                split_probability: 0.0,
                ..FaultProfile::default()
            },
        )
    }

    pub fn profile(&self) -> &FaultProfile {
        &self.profile
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn stream(&self) -> u64 {
        self.stream
    }

    /// The plan of connection `ordinal` (0 for the first) on this stream.
    ///
    /// A fault that strikes during the handshake costs the client a failed
    /// attempt (and up to a handshake timeout) without a WELCOME, and such
    /// attempts add up against the session TTL. So two in a row are never
    /// planned: after one, the next connection's fault is moved past the
    /// WELCOME. Faults alone then never keep a client away for a TTL.
    pub fn plan(&self, ordinal: u64) -> ConnectionPlan {
        if let Some(fixed) = &self.fixed {
            return usize::try_from(ordinal)
                .ok()
                .and_then(|n| fixed.get(n).copied())
                .unwrap_or(ConnectionPlan::PASS);
        }
        // Iterative rather than recursive: ordinals stay small, but a
        // stream hammered by restarts may see a few hundred connections.
        let mut previous_early = false;
        let mut plan = ConnectionPlan::PASS;
        for n in 0..=ordinal {
            plan = self.raw_plan(n);
            let early = plan.fault.is_some_and(|f| is_early(f.trigger()));
            if early && previous_early {
                plan.fault = plan.fault.map(|f| f.with_trigger(self.late_trigger(n)));
            }
            previous_early = early && !previous_early;
        }
        plan
    }

    /// A downstream byte trigger past the WELCOME, drawn from its own
    /// stream of randomness.
    fn late_trigger(&self, ordinal: u64) -> Trigger {
        let mut rng = self.rng(ordinal, b"nslate01");
        let max = self.profile.max_trigger_bytes.max(WELCOME_LEN + 1);
        Trigger::Bytes {
            direction: Direction::Downstream,
            after: rng.random_range(WELCOME_LEN..=max),
        }
    }

    fn rng(&self, ordinal: u64, domain: &[u8; 8]) -> ChaCha8Rng {
        seeded_rng(self.seed, self.stream, ordinal, domain)
    }

    fn raw_plan(&self, ordinal: u64) -> ConnectionPlan {
        let mut rng = self.rng(ordinal, b"nschaos1");
        let p = &self.profile;

        let latency = (rng.random_bool(p.latency_probability.clamp(0.0, 1.0))
            && !p.max_latency.is_zero())
        .then(|| {
            Duration::from_millis(rng.random_range(1..=p.max_latency.as_millis().max(1) as u64))
        });
        let split = rng
            .random_bool(p.split_probability.clamp(0.0, 1.0))
            .then(|| {
                if rng.random_bool(0.5) {
                    Direction::Downstream
                } else {
                    Direction::Upstream
                }
            });
        let faulty = ordinal < u64::from(p.max_faults)
            && !p.kinds.is_empty()
            && rng.random_bool(p.fault_probability.clamp(0.0, 1.0));
        let fault = faulty.then(|| {
            let kind = p.kinds[rng.random_range(0..p.kinds.len())];
            let at = self.trigger(&mut rng);
            let hold = p.hold;
            match kind {
                FaultKind::Close => Fault::Close(at),
                FaultKind::Reset => Fault::Reset(at),
                FaultKind::Stall => Fault::Stall {
                    at,
                    directions: match rng.random_range(0..3) {
                        0 => StallDirections::Downstream,
                        1 => StallDirections::Upstream,
                        _ => StallDirections::Both,
                    },
                    hold,
                },
                FaultKind::HalfClose => Fault::HalfClose {
                    at,
                    side: if rng.random_bool(0.5) {
                        Side::Client
                    } else {
                        Side::Server
                    },
                    hold,
                },
            }
        });
        ConnectionPlan {
            latency,
            split,
            fault,
        }
    }

    fn trigger(&self, rng: &mut ChaCha8Rng) -> Trigger {
        let p = &self.profile;
        match rng.random_range(0..10) {
            // Mostly downstream bytes: that is where the data is, and a cut
            // at a random byte lands mid-frame most of the time.
            0..=5 => Trigger::Bytes {
                direction: Direction::Downstream,
                after: rng.random_range(1..=p.max_trigger_bytes.max(1)),
            },
            // Upstream carries only the hello and the final ACK: cut inside
            // them (1..=50 covers a whole RESUME and most of an ACK).
            6 => Trigger::Bytes {
                direction: Direction::Upstream,
                after: rng.random_range(1..=50),
            },
            _ => {
                let min = p.min_trigger_time.as_millis() as u64;
                let max = (p.max_trigger_time.as_millis() as u64).max(min);
                Trigger::After(Duration::from_millis(rng.random_range(min..=max)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_a_pure_function_of_seed_stream_and_ordinal() {
        let a = Schedule::new(7, 3, FaultProfile::default());
        let b = Schedule::new(7, 3, FaultProfile::default());
        for ordinal in 0..50 {
            assert_eq!(a.plan(ordinal), b.plan(ordinal));
        }
        let other_seed = Schedule::new(8, 3, FaultProfile::default());
        let other_stream = Schedule::new(7, 4, FaultProfile::default());
        let differs = |s: &Schedule| (0..20).any(|n| s.plan(n) != a.plan(n));
        assert!(differs(&other_seed));
        assert!(differs(&other_stream));
    }

    #[test]
    fn faults_stop_after_max_faults_and_respect_the_profile() {
        let profile = FaultProfile {
            fault_probability: 1.0,
            max_faults: 5,
            kinds: vec![FaultKind::Reset, FaultKind::Stall],
            max_trigger_bytes: 100,
            ..FaultProfile::default()
        };
        let mut seen = std::collections::HashSet::new();
        for stream in 0..50 {
            let schedule = Schedule::new(1, stream, profile.clone());
            for ordinal in 0..5 {
                let fault = schedule.plan(ordinal).fault.expect("probability 1");
                seen.insert(fault.kind());
                match fault.trigger() {
                    Trigger::Bytes { after, direction } => {
                        assert!(after >= 1);
                        if direction == Direction::Downstream {
                            assert!(after <= 100);
                        }
                    }
                    Trigger::After(delay) => {
                        assert!(delay >= profile.min_trigger_time);
                        assert!(delay <= profile.max_trigger_time);
                    }
                }
            }
            for ordinal in 5..20 {
                assert_eq!(schedule.plan(ordinal).fault, None);
            }
        }
        assert_eq!(
            seen,
            [FaultKind::Reset, FaultKind::Stall].into_iter().collect()
        );
    }

    #[test]
    fn handshake_faults_never_come_twice_in_a_row() {
        let profile = FaultProfile {
            fault_probability: 1.0,
            max_faults: 40,
            max_trigger_bytes: 40,
            ..FaultProfile::default()
        };
        let mut early_seen = 0;
        for stream in 0..20 {
            let schedule = Schedule::new(3, stream, profile.clone());
            let early: Vec<bool> = (0..40)
                .map(|n| {
                    schedule
                        .plan(n)
                        .fault
                        .is_some_and(|f| is_early(f.trigger()))
                })
                .collect();
            early_seen += early.iter().filter(|e| **e).count();
            assert!(
                early.windows(2).all(|w| !(w[0] && w[1])),
                "stream {stream}: {early:?}"
            );
        }
        assert!(early_seen > 100, "handshake faults must still happen");
    }

    #[test]
    fn pass_schedule_never_interferes() {
        let schedule = Schedule::pass();
        for ordinal in 0..100 {
            assert_eq!(schedule.plan(ordinal), ConnectionPlan::PASS);
        }
    }

    #[test]
    fn plans_render_readably() {
        let plan = ConnectionPlan {
            latency: Some(Duration::from_millis(12)),
            split: Some(Direction::Downstream),
            fault: Some(Fault::Reset(Trigger::Bytes {
                direction: Direction::Downstream,
                after: 40,
            })),
        };
        assert_eq!(
            plan.to_string(),
            "reset (RST) after 40 downstream bytes; latency 12 ms; 1-byte writes downstream"
        );
        assert_eq!(ConnectionPlan::PASS.to_string(), "pass");
        assert_eq!(FaultKind::parse("half-close"), Some(FaultKind::HalfClose));
    }
}
