//! The delay between failed connection attempts: capped exponential growth
//! with full jitter.
//!
//! Full jitter (a uniform draw between zero and the exponential ceiling)
//! rather than a fixed schedule because many clients lose their server at
//! the same instant (a crash, a drain): without it they would all come back
//! in lock step and knock the next instance over together.

use std::time::Duration;

use rand::RngExt;

/// Capped exponential backoff with full jitter.
///
/// Attempt `n` (1-based) waits a uniformly random duration in
/// `0..=min(max, initial * multiplier^(n-1))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Ceiling of the first delay. Default 100 ms, so the first retry comes
    /// within 100 ms.
    pub initial: Duration,
    /// Cap on every delay. Default 5 s: a client waiting out a busy server
    /// (which may refuse for a whole 30 s session TTL) then retries on
    /// average every 2.5 s, so it takes a freed slot within seconds, and a
    /// thousand such clients cost the server a few hundred cheap refusals
    /// a second; a resuming client still gets about ten tries within the
    /// default TTL. A longer cap would mostly leave freed capacity idle.
    pub max: Duration,
    /// Growth of the ceiling per attempt. Default 2. Values below 1 (or NaN)
    /// are treated as 1: a shrinking backoff is never what anyone meant.
    pub multiplier: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            multiplier: 2.0,
        }
    }
}

impl Backoff {
    /// The largest delay attempt `attempt` (1-based; 0 is read as 1) may
    /// wait. Never panics, whatever the fields hold.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let multiplier = if self.multiplier >= 1.0 {
            self.multiplier
        } else {
            1.0
        };
        // Exponents past this only matter if the cap is astronomically large;
        // clamping keeps powi finite-or-infinity without wasting work.
        let exponent = attempt.saturating_sub(1).min(1024) as i32;
        let ceiling = self.initial.as_secs_f64() * multiplier.powi(exponent);
        let capped = ceiling.min(self.max.as_secs_f64());
        Duration::try_from_secs_f64(capped)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// A jittered delay for attempt `attempt`, drawn from `rng`.
    pub fn delay(&self, attempt: u32, rng: &mut impl rand::Rng) -> Duration {
        let ceiling = u64::try_from(self.ceiling(attempt).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=ceiling))
    }

    /// A jittered delay drawn from the thread-local generator.
    pub fn delay_for(&self, attempt: u32) -> Duration {
        self.delay(attempt, &mut rand::rng())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(42)
    }

    #[test]
    fn ceiling_grows_exponentially_then_caps() {
        let backoff = Backoff::default();
        let ms = |n| backoff.ceiling(n).as_millis();
        assert_eq!(ms(0), 100);
        assert_eq!(ms(1), 100);
        assert_eq!(ms(2), 200);
        assert_eq!(ms(3), 400);
        assert_eq!(ms(6), 3200);
        assert_eq!(ms(7), 5000);
        assert_eq!(ms(1000), 5000);
        assert_eq!(ms(u32::MAX), 5000);
    }

    #[test]
    fn delays_stay_within_the_ceiling_and_are_jittered() {
        let backoff = Backoff::default();
        let mut rng = rng();
        for attempt in 1..=20 {
            let draws: Vec<Duration> = (0..200).map(|_| backoff.delay(attempt, &mut rng)).collect();
            let ceiling = backoff.ceiling(attempt);
            assert!(draws.iter().all(|d| *d <= ceiling), "attempt {attempt}");
            let distinct: std::collections::HashSet<_> = draws.iter().collect();
            assert!(distinct.len() > 100, "attempt {attempt} is not jittered");
            // Full jitter: both halves of the range are used.
            assert!(draws.iter().any(|d| *d < ceiling / 2));
            assert!(draws.iter().any(|d| *d > ceiling / 2));
        }
    }

    #[test]
    fn first_retry_comes_within_the_initial_delay() {
        let backoff = Backoff::default();
        let mut rng = rng();
        for _ in 0..1000 {
            assert!(backoff.delay(1, &mut rng) <= Duration::from_millis(100));
        }
    }

    #[test]
    fn nonsense_parameters_never_panic_and_stay_capped() {
        let max = Duration::from_secs(1);
        for multiplier in [f64::NAN, f64::INFINITY, -3.0, 0.0, 0.5, 1e300] {
            for initial in [Duration::ZERO, Duration::from_secs(10), Duration::MAX] {
                let backoff = Backoff {
                    initial,
                    max,
                    multiplier,
                };
                for attempt in [0, 1, 2, 64, u32::MAX] {
                    assert!(backoff.ceiling(attempt) <= max);
                    assert!(backoff.delay_for(attempt) <= max);
                }
            }
        }
        let huge = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::MAX,
            multiplier: 2.0,
        };
        assert!(huge.delay(u32::MAX, &mut rng()) <= Duration::MAX);
    }

    #[test]
    fn multiplier_below_one_means_constant() {
        let backoff = Backoff {
            initial: Duration::from_millis(300),
            max: Duration::from_secs(5),
            multiplier: 0.5,
        };
        assert_eq!(backoff.ceiling(10), Duration::from_millis(300));
    }
}
