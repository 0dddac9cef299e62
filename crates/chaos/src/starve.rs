//! The starve fault: a live server process throttled by the harness, as a
//! container's CPU quota or a noisy neighbour would, without privileges.
//!
//! For a few seconds the process is frozen (SIGSTOP) for part of every
//! [`CYCLE`] and let run (SIGCONT) for the rest: stopped 150–400 ms out of
//! every 500 ms, so it gets 20–70% of the CPU it wants, in the bursts a
//! CFS quota gives. Its sockets keep working in the kernel meanwhile
//! (connections are accepted into the backlog, bytes are buffered), and
//! its timers, store replies and clients all come due while it cannot
//! run: exactly the scheduling lag that issue 15's overload control reacts
//! to. Nothing is lost by the fault itself, so every client must still
//! pass; a session shed because the server read its store's replies late
//! is a failure the run reports.
//!
//! Like everything else in a run, the events come from the seed: when,
//! which server, for how long, and how long each cycle stops it.

use std::time::Duration;

use chacha20::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::servers::ServerProcess;

/// One period of the duty cycle: stopped for part of it, running for the
/// rest (a CFS period is 100 ms; five of them make the starvation coarse
/// enough to pass the server's 100 ms lag target in one go).
pub const CYCLE: Duration = Duration::from_millis(500);
/// How long one cycle keeps the process stopped, drawn per cycle.
pub const STOPPED_PER_CYCLE: (Duration, Duration) =
    (Duration::from_millis(150), Duration::from_millis(400));

/// A scheduled starvation of one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StarveEvent {
    pub at: Duration,
    pub server: usize,
    /// How long each successive [`CYCLE`] stops the process: the event
    /// lasts `stops.len()` cycles.
    pub stops: Vec<Duration>,
}

impl StarveEvent {
    pub fn length(&self) -> Duration {
        CYCLE.saturating_mul(self.stops.len() as u32)
    }

    /// The share of its length the process is stopped.
    pub fn stopped_share(&self) -> f64 {
        let stopped: Duration = self.stops.iter().sum();
        stopped.as_secs_f64() / self.length().as_secs_f64().max(f64::EPSILON)
    }
}

/// How a run starves its servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StarveProfile {
    /// How many starvations (none: 0).
    pub count: usize,
    /// They start at random moments in this window after the run starts.
    pub window: (Duration, Duration),
    /// Each lasts this long (rounded to whole cycles).
    pub length: (Duration, Duration),
}

impl StarveProfile {
    pub const NONE: StarveProfile = StarveProfile {
        count: 0,
        window: (Duration::ZERO, Duration::ZERO),
        length: (Duration::ZERO, Duration::ZERO),
    };
}

/// The starvations of a run with `seed` over `servers` instances, in
/// order of time.
pub fn starve_plan(profile: &StarveProfile, seed: u64, servers: usize) -> Vec<StarveEvent> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7374_6172_7665_7321);
    let ms = |d: Duration| d.as_millis() as u64;
    let between = |rng: &mut ChaCha8Rng, (low, high): (Duration, Duration)| {
        Duration::from_millis(rng.random_range(ms(low)..=ms(high).max(ms(low))))
    };
    let mut events: Vec<StarveEvent> = (0..profile.count)
        .map(|_| {
            let at = between(&mut rng, profile.window);
            let server = rng.random_range(0..servers.max(1));
            let cycles = (ms(between(&mut rng, profile.length)) / ms(CYCLE)).max(1);
            let stops = (0..cycles)
                .map(|_| between(&mut rng, STOPPED_PER_CYCLE))
                .collect();
            StarveEvent { at, server, stops }
        })
        .collect();
    events.sort_by_key(|event| event.at);
    events
}

/// A starvation as it happened.
#[derive(Debug, Clone, Copy)]
pub struct Starved {
    pub server: usize,
    pub from: Instant,
    pub until: Instant,
    /// How long the process was stopped in all.
    pub stopped: Duration,
}

/// Thaws the process however the cycle ends (a cancelled or aborted task
/// included): a server left stopped would look like a hang of every
/// client on it.
struct Frozen<'a>(&'a ServerProcess);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if let Err(error) = self.0.thaw() {
            eprintln!("cannot thaw server {}: {error}", self.0.index());
        }
    }
}

/// Runs `event`'s duty cycles on `server`, stopping early (always thawed)
/// when `done` is cancelled. An error sending a signal ends the event: the
/// process has gone, which the run notices by itself.
pub async fn starve(
    server: &ServerProcess,
    event: &StarveEvent,
    done: &CancellationToken,
) -> std::io::Result<Starved> {
    let from = Instant::now();
    let mut stopped = Duration::ZERO;
    for &stop in &event.stops {
        let cycle_started = Instant::now();
        {
            server.freeze()?;
            let _thaw = Frozen(server);
            tokio::select! {
                () = done.cancelled() => {}
                () = tokio::time::sleep(stop) => {}
            }
        }
        stopped += cycle_started.elapsed();
        tokio::select! {
            () = done.cancelled() => break,
            () = tokio::time::sleep_until(cycle_started + CYCLE) => {}
        }
    }
    Ok(Starved {
        server: event.server,
        from,
        until: Instant::now(),
        stopped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> StarveProfile {
        StarveProfile {
            count: 20,
            window: (Duration::from_secs(1), Duration::from_secs(60)),
            length: (Duration::from_secs(2), Duration::from_secs(6)),
        }
    }

    #[test]
    fn the_plan_derives_from_the_seed_and_respects_the_profile() {
        let plan = starve_plan(&profile(), 7, 3);
        assert_eq!(plan, starve_plan(&profile(), 7, 3));
        assert_ne!(plan, starve_plan(&profile(), 8, 3));
        assert_eq!(plan.len(), 20);
        assert!(plan.windows(2).all(|w| w[0].at <= w[1].at));
        for event in &plan {
            assert!(event.server < 3);
            assert!((Duration::from_secs(1)..=Duration::from_secs(60)).contains(&event.at));
            assert!((4..=12).contains(&event.stops.len()), "{event:?}");
            assert!(
                event
                    .stops
                    .iter()
                    .all(|s| (STOPPED_PER_CYCLE.0..=STOPPED_PER_CYCLE.1).contains(s))
            );
            let share = event.stopped_share();
            assert!((0.3..=0.8).contains(&share), "{share}");
        }
        assert!(starve_plan(&StarveProfile::NONE, 7, 3).is_empty());
    }
}
