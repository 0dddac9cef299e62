//! Admission control before overload turns into failure: the server
//! watches how late its own runtime runs tasks (scheduling lag) and how
//! long the session store takes to answer, and while either is past its
//! threshold it turns new sessions away (`server_busy`, retry) early and
//! cheaply, before they cost a store write, so that the sessions it has
//! already admitted, and their resumes, keep what capacity there is.
//!
//! A server short of CPU that keeps admitting does not slow down evenly:
//! every admitted stream makes every other one later, store replies are
//! read after their timeouts, streams are shed, and each shed stream comes
//! back as a resume that costs more work still. Refusing new work while
//! the signs are there keeps the load at what the machine can carry.
//!
//! Both signals are smoothed (an exponentially weighted moving average of
//! samples every [`PROBE_EVERY`]), and shedding is proportional: past its
//! threshold a signal turns away a growing share of new sessions, all of
//! them at twice the threshold. A server slightly over refuses a few and
//! still admits most, so it settles where the load it admits is the load
//! it can carry; an on/off gate instead refused every newcomer for as
//! long as the server hovered near its threshold (a debug build under
//! attack did, for minutes, in the chaos run), and clients gave up. Which
//! OPENs are turned away is decided by a low-discrepancy sequence over all
//! OPENs, not by anything a client sends, so none can pick its way in.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use numstream_store::SessionStore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often the scheduling-lag probe runs.
pub(crate) const PROBE_EVERY: Duration = Duration::from_millis(100);
/// Weight of a new lag sample in its moving average: about the last ten
/// samples (a second of probes) count.
const LAG_SMOOTHING: f64 = 0.2;

/// When to refuse new sessions; `None` turns a signal off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverloadLimits {
    /// Smoothed lateness of the runtime's timers past which new sessions
    /// are refused.
    pub scheduling_lag: Option<Duration>,
    /// Smoothed store round trip past which new sessions are refused.
    pub store_latency: Option<Duration>,
}

impl Default for OverloadLimits {
    /// 500 ms of either: far above a healthy server (microseconds of lag,
    /// a millisecond to Redis), well below where streams start to fail
    /// (lateness in seconds, store operations at their 2 s timeout).
    fn default() -> Self {
        Self {
            scheduling_lag: Some(Duration::from_millis(500)),
            store_latency: Some(Duration::from_millis(500)),
        }
    }
}

impl OverloadLimits {
    pub const OFF: OverloadLimits = OverloadLimits {
        scheduling_lag: None,
        store_latency: None,
    };
}

/// Why the server turns new sessions away right now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overloaded {
    pub scheduling_lag: Duration,
    pub store_latency: Duration,
    /// Share of new sessions turned away, in (0, 1].
    pub shedding: f64,
}

impl std::fmt::Display for Overloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "overloaded (scheduling lag {} ms, store latency {} ms; turning away {:.0}% of new sessions)",
            self.scheduling_lag.as_millis(),
            self.store_latency.as_millis(),
            self.shedding * 100.0
        )
    }
}

/// The two signals and the admission state, shared by the probe, the
/// store wrapper that times operations, the connections and `/readyz`.
#[derive(Debug)]
pub struct Overload {
    limits: OverloadLimits,
    /// Smoothed values, in nanoseconds (atomics of f64 bits would do, but
    /// whole nanoseconds are plenty).
    lag_ns: AtomicU64,
    store_ns: AtomicU64,
    /// Whether the last sample shed anything (for the log lines when that
    /// changes).
    shedding: AtomicBool,
    /// OPENs decided so far: the index into the low-discrepancy sequence.
    decided: AtomicU64,
}

fn to_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Folds `sample` into the exponentially weighted moving average kept in
/// `average` (nanoseconds), giving the sample `weight`. Shared by the lag
/// probe and the isolated store's latency.
pub(crate) fn smooth(average: &AtomicU64, sample: Duration, weight: f64) {
    let sample = to_ns(sample) as f64;
    // Lost updates between racing writers only drop a sample.
    let old = average.load(Ordering::Relaxed) as f64;
    let new = old + weight * (sample - old);
    average.store(new as u64, Ordering::Relaxed);
}

impl Overload {
    pub fn new(limits: OverloadLimits) -> Self {
        Self {
            limits,
            lag_ns: AtomicU64::new(0),
            store_ns: AtomicU64::new(0),
            shedding: AtomicBool::new(false),
            decided: AtomicU64::new(0),
        }
    }

    pub fn scheduling_lag(&self) -> Duration {
        Duration::from_nanos(self.lag_ns.load(Ordering::Relaxed))
    }

    pub fn store_latency(&self) -> Duration {
        Duration::from_nanos(self.store_ns.load(Ordering::Relaxed))
    }

    /// One lateness sample of the runtime.
    pub(crate) fn record_lag(&self, lag: Duration) {
        smooth(&self.lag_ns, lag, LAG_SMOOTHING);
        self.update();
    }

    /// The store's smoothed round trip, as the store saw it (not as a
    /// starved caller did: see `isolated`).
    pub(crate) fn set_store_latency(&self, latency: Duration) {
        self.store_ns.store(to_ns(latency), Ordering::Relaxed);
        self.update();
    }

    /// Share of new sessions to turn away now: for each signal, how far
    /// past its threshold it is, as a fraction of the threshold (all of
    /// them at twice it); the larger of the two.
    pub fn shedding(&self) -> f64 {
        let past = |value: Duration, limit: Option<Duration>| match limit {
            Some(limit) if !limit.is_zero() => {
                (value.as_secs_f64() / limit.as_secs_f64() - 1.0).clamp(0.0, 1.0)
            }
            _ => 0.0,
        };
        past(self.scheduling_lag(), self.limits.scheduling_lag)
            .max(past(self.store_latency(), self.limits.store_latency))
    }

    fn update(&self) {
        let now = self.shedding() > 0.0;
        if self.shedding.swap(now, Ordering::Relaxed) != now {
            let (lag, store) = (self.scheduling_lag(), self.store_latency());
            if now {
                tracing::warn!(
                    scheduling_lag_ms = lag.as_millis() as u64,
                    store_latency_ms = store.as_millis() as u64,
                    "overloaded: turning away a share of new sessions until it passes \
                     (resumes are still served)"
                );
            } else {
                tracing::info!(
                    scheduling_lag_ms = lag.as_millis() as u64,
                    store_latency_ms = store.as_millis() as u64,
                    "no longer overloaded: admitting every new session again"
                );
            }
        }
    }

    /// `Some` while a share of new sessions is turned away.
    pub fn overloaded(&self) -> Option<Overloaded> {
        let shedding = self.shedding();
        (shedding > 0.0).then(|| Overloaded {
            scheduling_lag: self.scheduling_lag(),
            store_latency: self.store_latency(),
            shedding,
        })
    }

    /// Whether to admit one new session, or why not. Over successive calls
    /// the share turned away is [`Overload::shedding`], spread evenly (the
    /// golden-ratio sequence), whoever asks.
    pub(crate) fn admit(&self) -> Result<(), Overloaded> {
        let Some(overloaded) = self.overloaded() else {
            return Ok(());
        };
        const GOLDEN: f64 = 0.618_033_988_749_894_9;
        let n = self.decided.fetch_add(1, Ordering::Relaxed);
        let position = (n as f64 * GOLDEN).fract();
        if position < overloaded.shedding {
            Err(overloaded)
        } else {
            Ok(())
        }
    }

    /// Every [`PROBE_EVERY`] until `stop` (the server's shutdown): measures
    /// the runtime's scheduling lag (how much later than asked a timer's
    /// task got to run, which is how late every other task runs too) and
    /// reads the store's latency, if the store measures it. (Not until the
    /// last `Arc` goes: `/readyz` keeps one for as long as the process
    /// serves it.)
    pub(crate) fn spawn_probe(
        self: &Arc<Self>,
        store: Arc<dyn SessionStore>,
        stop: CancellationToken,
    ) {
        if self.limits == OverloadLimits::OFF {
            return;
        }
        let overload = self.clone();
        tokio::spawn(async move {
            loop {
                let asked = Instant::now() + PROBE_EVERY;
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep_until(asked) => {}
                }
                let lag = Instant::now().saturating_duration_since(asked);
                if let Some(latency) = store.latency() {
                    overload.set_store_latency(latency);
                }
                overload.record_lag(lag);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn sheds_in_proportion_to_how_far_past_its_threshold_it_is() {
        let overload = Overload::new(OverloadLimits {
            scheduling_lag: Some(ms(500)),
            store_latency: Some(ms(500)),
        });
        for _ in 0..50 {
            overload.record_lag(ms(10));
        }
        assert_eq!(overload.overloaded(), None);
        assert!((0..1000).all(|_| overload.admit().is_ok()));
        // Smoothed to about 750 ms: half past the threshold, half turned away.
        for _ in 0..100 {
            overload.record_lag(ms(750));
        }
        let why = overload.overloaded().expect("overloaded");
        assert!((why.shedding - 0.5).abs() < 0.01, "{why}");
        let refused = (0..1000).filter(|_| overload.admit().is_err()).count();
        assert!((490..=510).contains(&refused), "{refused} of 1000 refused");
        // Twice the threshold or more: everyone.
        for _ in 0..100 {
            overload.record_lag(ms(5_000));
        }
        assert!((0..100).all(|_| overload.admit().is_err()));
        // Back under: everyone again.
        for _ in 0..100 {
            overload.record_lag(ms(100));
        }
        assert_eq!(overload.overloaded(), None);
        // The store signal alone does it too.
        overload.set_store_latency(ms(1_000));
        assert_eq!(overload.shedding(), 1.0);
        overload.set_store_latency(ms(100));
        assert_eq!(overload.overloaded(), None);
    }

    #[test]
    fn one_late_sample_is_not_overload() {
        let overload = Overload::new(OverloadLimits::default());
        overload.record_lag(ms(2_000));
        assert_eq!(
            overload.overloaded(),
            None,
            "lag {:?}",
            overload.scheduling_lag()
        );
    }

    #[test]
    fn off_never_refuses() {
        let overload = Overload::new(OverloadLimits::OFF);
        for _ in 0..50 {
            overload.record_lag(ms(10_000));
            overload.set_store_latency(ms(10_000));
        }
        assert_eq!(overload.overloaded(), None);
    }

    /// A runtime whose only thread is kept busy runs timers late: the
    /// probe sees it and the server turns new sessions away.
    #[test]
    fn a_starved_runtime_is_detected() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let overload = Arc::new(Overload::new(OverloadLimits {
                scheduling_lag: Some(ms(100)),
                store_latency: None,
            }));
            overload.spawn_probe(
                Arc::new(numstream_store::InMemoryStore::new(1)),
                CancellationToken::new(),
            );
            // Hog the thread: each turn blocks it for 300 ms before yielding.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while overload.overloaded().is_none() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "a runtime blocked 300 ms at a time was never seen overloaded (lag {:?})",
                    overload.scheduling_lag()
                );
                std::thread::sleep(ms(300));
                tokio::task::yield_now().await;
            }
            // Let it breathe: the lag falls and admission resumes.
            while overload.overloaded().is_some() {
                assert!(std::time::Instant::now() < deadline, "never recovered");
                tokio::time::sleep(ms(50)).await;
            }
        });
    }
}
