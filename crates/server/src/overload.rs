//! Admission control before overload turns into failure: the server
//! watches how late its own runtime runs tasks (scheduling lag) and how
//! long the session store takes to answer, learns from the lag how many
//! sessions it can stream at once, and turns new sessions away
//! (`server_busy`, retry) early and cheaply past that, before they cost a
//! store write, so that the sessions it has already admitted, and their
//! resumes, keep what capacity there is.
//!
//! A server short of CPU that keeps admitting does not slow down evenly:
//! every admitted stream makes every other one later, store replies are
//! read after their timeouts, streams are shed, and each shed stream comes
//! back as a resume that costs more work still. And an admitted session
//! is a promise for its whole length (40 numbers are 40 seconds): once
//! the core is past its capacity, nothing but time takes load off it, so
//! refusing late is too late. Hence two mechanisms:
//!
//! - **A stream limit, found like TCP's congestion window** ([`StreamLimit`]):
//!   none until the lag (or, with a shared store, how long lease renewals
//!   wait for the store, [`SessionStore::renewal_lag`]) first passes its
//!   target (`--overload-lag`); then
//!   at most 90% of the sessions streaming at that moment, cut again
//!   while the lag stays high and the streams are at the limit, and
//!   growing by 2% a second while the lag is healthy and the limit is
//!   what holds admissions back. New
//!   sessions past it are refused; resumes never are. So the server
//!   settles at what its core carries, whatever that is (a container's
//!   CPU quota, a noisy neighbour, a slower machine), without an operator
//!   guessing a number.
//! - **Proportional shedding** on either signal far past its threshold
//!   (the lag at five times its target, the store latency at its
//!   threshold): a share of new sessions growing with how far past it is,
//!   all of them at twice that. This covers load that is not streams (a
//!   flood of handshakes, a slow store), below the limit's floor. Which
//!   OPENs are turned away is decided by a low-discrepancy sequence over
//!   all OPENs, not by anything a client sends, so none can pick its way
//!   in; and a share rather than all, because an on/off gate refused every
//!   newcomer for as long as a server hovered near its threshold (a debug
//!   build under attack did, for minutes, in the chaos run), and clients
//!   gave up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use numstream_store::SessionStore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Telemetry;

/// How often the scheduling-lag probe runs.
pub(crate) const PROBE_EVERY: Duration = Duration::from_millis(100);
/// Weight of a new lag sample in the moving average that is reported and
/// shed on: about the last ten samples (a second of probes) count.
const LAG_SMOOTHING: f64 = 0.2;
/// Weight of a new lag sample in the average the stream limit reacts to:
/// about the last two or three samples, so that the limit stops growing
/// within a few hundred milliseconds of the core running out (every
/// session admitted meanwhile is a stream for its whole length), while
/// one late sample alone does not pass the target.
const LIMIT_SMOOTHING: f64 = 0.5;
/// Longest an OPEN waits for a place under the stream limit before it is
/// refused (see [`Overload::admit`]). The client waits 5 s for its answer,
/// and an OPEN admitted at the end of its hold still needs a store write
/// and a WELCOME on a server running late: with 3 s, some WELCOMEs came
/// after their client had given up, leaving sessions nobody could resume
/// until they expired (measured: 84 of 50,000).
pub(crate) const OPEN_HOLD: Duration = Duration::from_secs(2);
/// An OPEN still waiting for its store write this long after its
/// connection was accepted is refused (`server_busy`) instead of created:
/// its WELCOME would come after the client stopped waiting (5 s from its
/// hello in the reference client), and the session it created would be an
/// orphan nobody holds the token of, blocking that client id until it
/// expires (the client's next OPEN gets `session_exists`). Room for the
/// store write and a late runtime to send the WELCOME: 2 s.
pub(crate) const LATEST_CREATE: Duration = Duration::from_secs(3);
/// Default [`OverloadLimits::run_queue`]: a healthy server's shared run
/// queue holds a handful of tasks; under the overload of issue 15 it held
/// 6,000–13,000 and each waited 3–5 s there, and at 2,000–3,300 a task
/// waited 0.4–1.5 s (measured with a probe woken from another thread,
/// against `global_queue_depth`): within the 5 s a client gives its
/// handshake. 3,000 rather than 1,000 because at 80,000
/// sessions on one core with Redis it verified more (92.4–98.8%, median
/// 94.0%, in four runs, against 87.3–94.9%, median 92.3%, in three; every
/// session admitted kept either way).
pub const DEFAULT_RUN_QUEUE: u32 = 3_000;
/// How often a paused accept loop looks at the run queue again.
const RUN_QUEUE_RECHECK: Duration = Duration::from_millis(10);
/// Longest the accept loop waits for the run queue at a stretch (after
/// which it takes [`ACCEPTS_AFTER_PAUSE`] connections before it looks
/// again): when streams, not new connections, keep the queue deep, a wait
/// until it drained would lock every client out, resumes included, for as
/// long as that lasts (an earlier pause on the scheduling lag did, for
/// minutes, in a debug build under the chaos run's attack).
pub(crate) const LONGEST_ACCEPT_PAUSE: Duration = Duration::from_secs(2);
/// Connections taken from the backlog after a pause before the accept loop
/// looks at the run queue again: so that a queue that stays deep still
/// lets connections (and the resumes among them) in at a bounded rate.
pub(crate) const ACCEPTS_AFTER_PAUSE: usize = 128;
/// How long lease renewals may wait for a shared store before the stream
/// limit treats it as the scheduling lag at its target: a tenth of the
/// 20 s a (default, 30 s) lease leaves before a stream must stop. Not the
/// lag's own 500 ms: a renewal waits behind the batch in flight even with
/// the store healthy, and what the leases can afford is seconds, while a
/// store that is really behind makes renewals wait many seconds (issue
/// 15's 100,000-session run: past 20 s for 40,715 streams). The one
/// 80,000-session run with 500 ms verified 90.5%, too few runs to tell
/// either way (BENCHMARKS.md, "A store that falls behind").
const RENEWAL_LAG_TARGET: Duration = Duration::from_secs(2);
/// Proportional shedding on the lag starts at this many times its target.
const SHED_FROM_TARGETS: u32 = 5;
/// The hold takes at most this many times the OPENs that places freed for
/// over the last [`OPEN_HOLD`] (see [`Overload::hold_capacity`]): room for
/// the rate to climb, since the hold's own size caps what it can show.
const HOLD_SLACK: f64 = 2.0;
/// The hold takes at least this many OPENs, whatever the rate: enough for
/// it to show a rate at all when places start to free.
const HOLD_FLOOR: usize = 64;
/// Weight of one probe's count of held OPENs admitted in their smoothed
/// rate: about the last two seconds count.
const HOLD_RATE_SMOOTHING: f64 = 0.05;

/// When to refuse new sessions; `None` turns a signal off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverloadLimits {
    /// The scheduling lag the server keeps under: past it, the stream
    /// limit stops growing and is cut; past five times it, a share of new
    /// sessions is refused too.
    pub scheduling_lag: Option<Duration>,
    /// Smoothed store round trip past which a share of new sessions is
    /// refused.
    pub store_latency: Option<Duration>,
    /// The stream limit is never cut below this many streams
    /// ([`StreamLimit::FLOOR`] by default: lag with fewer streams is not
    /// caused by streaming). Not a flag: no operator has a reason to move
    /// it. It is a field so that a test can reach the limit with a few
    /// dozen sessions on a deliberately starved runtime, where the lag
    /// comes from a hog rather than the streams, exactly the case the
    /// floor exists for.
    pub stream_floor: usize,
    /// Tasks waiting in the runtime's shared run queue past which the
    /// accept loop takes no connections until the queue drains (see
    /// [`Overload::wait_for_run_queue`]).
    pub run_queue: Option<usize>,
}

impl Default for OverloadLimits {
    /// Lag target 500 ms: well above a healthy server's (a millisecond or
    /// two; the kernel's time slices add tens of milliseconds when several
    /// busy processes share a core), well below where streams fail (a
    /// client gives a connection 5 s of silence). Lower is not safer:
    /// every session refused comes back, and a waiting client's attempts
    /// (a connection, a hello, an ERROR every few seconds) cost this
    /// server about what streaming to it would; a limit found at 100 ms
    /// settled at 40% of what the core carried and left the rest of the
    /// core to refusals (80,000 sessions on one core with Redis, issue 15:
    /// 49,000–58,000 verified at 100 ms, 70,000 at 500 ms, 66,000 at 1 s,
    /// 51,000 with no limit). Shedding on the lag then starts at 2.5 s; on
    /// the store at 500 ms (a millisecond to Redis normally, operations
    /// time out at 2 s).
    fn default() -> Self {
        Self {
            scheduling_lag: Some(Duration::from_millis(500)),
            store_latency: Some(Duration::from_millis(500)),
            stream_floor: StreamLimit::FLOOR,
            run_queue: Some(DEFAULT_RUN_QUEUE as usize),
        }
    }
}

impl OverloadLimits {
    pub const OFF: OverloadLimits = OverloadLimits {
        scheduling_lag: None,
        store_latency: None,
        stream_floor: StreamLimit::FLOOR,
        run_queue: None,
    };
}

/// The most sessions a server streams at once before it refuses new ones,
/// learned from its scheduling lag; pure, so that it is tested without a
/// runtime (time and the stream count are passed in).
///
/// Additive increase, multiplicative decrease, as in TCP congestion
/// control, with one difference that matters: a cut does not take load
/// off (the admitted sessions stream to their end), so a cut is taken
/// from the streams now, `min(limit, 90% of streams)`, and a lag that
/// stays high while the count stays put does not cut again and again
/// down to nothing. Nor does a lag that stays high while sessions end by
/// themselves: the load is already falling, and the lag then comes from
/// work that is not streams (sessions completing, a wave of held OPENs
/// admitted at once). An earlier version followed the streams down in
/// that case and, over one 80,000-session run, took each server's limit
/// from 6,700 to 2,500 in the middle of the run while 20,000 clients
/// waited (measured with a probe trace; issue 15). So a cut after the
/// first needs the limit to be what holds the load where it is (streams
/// at the limit, new sessions being admitted as places free), and comes at most once per [`StreamLimit::CUT_SPACING`],
/// the time a cut needs to show in the lag, as TCP cuts once per round
/// trip.
#[derive(Debug, Clone)]
pub(crate) struct StreamLimit {
    target: Duration,
    /// Never cut below this ([`StreamLimit::FLOOR`] but in tests).
    floor: usize,
    /// `None` until the lag first passes the target: a server that has
    /// never run short has no reason to guess its capacity.
    limit: Option<usize>,
    /// The lag the limit reacts to (smoothed over a few samples).
    lag: Duration,
    /// Time since the last cut (`None` before the first).
    since_cut: Option<Duration>,
}

impl StreamLimit {
    /// Never cut below this many streams (by default; see
    /// [`OverloadLimits::stream_floor`]): a thousand streams cost a few
    /// percent of a core, so lag with fewer is caused by something else,
    /// which refusing sessions would not fix (proportional shedding is
    /// there for that).
    pub(crate) const FLOOR: usize = 1_000;
    /// A cut keeps this share of the streams running when the lag passed.
    const CUT_TO: f64 = 0.9;
    /// Growth per second while the lag is healthy and the limit holds
    /// admissions back: slow enough that the lag, a second or two behind
    /// the load, catches an overshoot while it is a few percent.
    const GROWTH_PER_SECOND: f64 = 0.02;
    /// Growth per second while the lag is under a fifth of its target: the
    /// load that made the server cut has gone (a burst of handshakes, a
    /// storm of refused clients), and at 2% a second a limit cut to half
    /// would take 35 s to come back while capacity sat idle (measured: a
    /// server held at 1,913 streams with 1 ms of lag while clients gave
    /// up).
    const FAST_GROWTH_PER_SECOND: f64 = 0.10;
    /// The limit counts as holding admissions back once the streams are
    /// within this share of it; further below, growing it would only let
    /// a later burst through unchecked.
    const BINDING: f64 = 0.95;
    /// Least time between two cuts: about what the smoothed lag takes to
    /// show the effect of the last one.
    const CUT_SPACING: Duration = Duration::from_secs(2);

    pub(crate) fn new(target: Duration, floor: usize) -> Self {
        Self {
            target,
            floor,
            limit: None,
            lag: Duration::ZERO,
            since_cut: None,
        }
    }

    #[cfg(test)]
    fn limit(&self) -> Option<usize> {
        self.limit
    }

    /// How long renewals waited, as the lag that is as far past this
    /// limit's target as that wait is past [`RENEWAL_LAG_TARGET`].
    fn renewal_wait_as_lag(&self, waited: Duration) -> Duration {
        self.target
            .mul_f64(waited.as_secs_f64() / RENEWAL_LAG_TARGET.as_secs_f64())
    }

    /// Folds in one lag sample taken `elapsed` after the previous one,
    /// with `streams` sessions streaming now; returns the new limit.
    pub(crate) fn on_sample(
        &mut self,
        lag: Duration,
        elapsed: Duration,
        streams: usize,
    ) -> Option<usize> {
        let old = self.lag.as_secs_f64();
        self.lag = Duration::from_secs_f64(old + LIMIT_SMOOTHING * (lag.as_secs_f64() - old));
        if let Some(since) = self.since_cut.as_mut() {
            *since = since.saturating_add(elapsed);
        }
        if self.lag > self.target {
            let may_cut = match (self.limit, self.since_cut) {
                (None, _) | (_, None) => true,
                // Streams past the limit are the overshoot the last cut
                // already covers: nobody is being admitted.
                (Some(limit), Some(since)) => {
                    since >= Self::CUT_SPACING
                        && streams <= limit
                        && streams as f64 >= limit as f64 * Self::BINDING
                }
            };
            if may_cut && streams > self.floor {
                let base = self.limit.map_or(streams, |limit| limit.min(streams));
                let cut = ((base as f64 * Self::CUT_TO) as usize).max(self.floor);
                self.limit = Some(self.limit.map_or(cut, |limit| limit.min(cut)));
                self.since_cut = Some(Duration::ZERO);
            }
        } else if let Some(limit) = self.limit
            && streams as f64 >= limit as f64 * Self::BINDING
        {
            let rate = if self.lag < self.target / 5 {
                Self::FAST_GROWTH_PER_SECOND
            } else {
                Self::GROWTH_PER_SECOND
            };
            let growth = limit as f64 * rate * elapsed.as_secs_f64();
            self.limit = Some(limit.saturating_add((growth as usize).max(1)));
        }
        self.limit
    }
}

/// The stream limit's log lines: when it is first set and then whenever it
/// has moved by a twentieth since the last line, at most once a second,
/// so an operator sees the capacity the server found without a line per
/// probe.
#[derive(Debug, Default)]
struct LimitReport {
    logged: Option<(Instant, usize)>,
}

impl LimitReport {
    fn maybe_log(&mut self, now: Instant, limit: Option<usize>, streams: usize, lag: Duration) {
        let Some(limit) = limit else { return };
        let due = match self.logged {
            None => true,
            Some((at, last)) => {
                now.saturating_duration_since(at) >= Duration::from_secs(1)
                    && limit.abs_diff(last) * 20 >= last
            }
        };
        if due {
            tracing::info!(
                stream_limit = limit,
                streams,
                scheduling_lag_ms = lag.as_millis() as u64,
                "stream limit moved: new sessions past it get server_busy"
            );
            self.logged = Some((now, limit));
        }
    }
}

/// Why the server turns new sessions away right now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overloaded {
    pub scheduling_lag: Duration,
    pub store_latency: Duration,
    /// `Some((streams, limit))` when the server streams as many sessions
    /// as it has learned it can carry: every new session is refused.
    pub at_stream_limit: Option<(usize, usize)>,
    /// Share of new sessions turned away by proportional shedding, in
    /// [0, 1].
    pub shedding: f64,
}

impl std::fmt::Display for Overloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (lag, store) = (
            self.scheduling_lag.as_millis(),
            self.store_latency.as_millis(),
        );
        match self.at_stream_limit {
            Some((streams, limit)) => write!(
                f,
                "overloaded (streaming {streams} sessions, at the {limit} its CPU was found to carry; \
                 scheduling lag {lag} ms, store latency {store} ms)"
            ),
            None => write!(
                f,
                "overloaded (scheduling lag {lag} ms, store latency {store} ms; turning away {:.0}% \
                 of new sessions)",
                self.shedding * 100.0
            ),
        }
    }
}

impl Overloaded {
    /// The answer to an OPEN turned away for this.
    pub(crate) fn refusal(&self) -> numstream_protocol::ErrorFrame {
        numstream_protocol::ErrorFrame::new(
            numstream_protocol::ErrorCode::ServerBusy,
            format!("server is {self}; try again shortly or on another instance"),
        )
    }
}

/// The signals and the admission state, shared by the probe, the store
/// wrapper that times operations, the connections and `/readyz`.
#[derive(Debug)]
pub struct Overload {
    limits: OverloadLimits,
    /// Smoothed values, in nanoseconds (atomics of f64 bits would do, but
    /// whole nanoseconds are plenty).
    lag_ns: AtomicU64,
    store_ns: AtomicU64,
    /// [`SessionStore::renewal_lag`] at the last probe.
    renewal_lag_ns: AtomicU64,
    /// Whether the accept loop waits for the run queue to drain.
    accept_paused: AtomicBool,
    /// The stream limit the probe last computed; `usize::MAX` for none.
    stream_limit: AtomicUsize,
    /// Streams at the last probe, for `/readyz` and the gauges (the
    /// connections pass the exact count to [`Overload::admit`]).
    streams_sampled: AtomicUsize,
    /// OPENs admitted whose stream has not started yet: they count against
    /// the limit too, or a burst of OPENs would all pass it while their
    /// store writes are in flight.
    opening: AtomicUsize,
    /// Whether the server refused anything at the last sample (for the log
    /// lines when that changes).
    refusing: AtomicBool,
    /// OPENs decided so far: the index into the low-discrepancy sequence.
    decided: AtomicU64,
    /// OPENs waiting for room under the stream limit, and how they are
    /// woken: the probe hands out one wake-up per free place, first come
    /// first served.
    waiting: AtomicUsize,
    room: tokio::sync::Notify,
    /// Held OPENs admitted since the last probe, and their smoothed rate
    /// (thousandths per second): how fast places free for the hold.
    held_admitted: AtomicUsize,
    hold_rate_milli: AtomicU64,
}

pub(crate) fn to_ns(duration: Duration) -> u64 {
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

/// One unit of a count (an admitted OPEN on its way to streaming, which
/// counts against the stream limit until its stream counts itself; an
/// OPEN waiting for a place), given back when dropped.
#[derive(Debug)]
pub(crate) struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Overload {
    pub fn new(limits: OverloadLimits) -> Self {
        Self {
            limits,
            lag_ns: AtomicU64::new(0),
            store_ns: AtomicU64::new(0),
            renewal_lag_ns: AtomicU64::new(0),
            accept_paused: AtomicBool::new(false),
            stream_limit: AtomicUsize::new(usize::MAX),
            streams_sampled: AtomicUsize::new(0),
            opening: AtomicUsize::new(0),
            refusing: AtomicBool::new(false),
            decided: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            room: tokio::sync::Notify::new(),
            held_admitted: AtomicUsize::new(0),
            hold_rate_milli: AtomicU64::new(0),
        }
    }

    /// `Some(limit)` while the accept loop waits for the runtime's shared
    /// run queue to drain below `limit` tasks.
    pub fn accept_paused(&self) -> Option<usize> {
        self.limits
            .run_queue
            .filter(|_| self.accept_paused.load(Ordering::Relaxed))
    }

    /// While the runtime's shared run queue holds more than
    /// [`OverloadLimits::run_queue`] tasks (`depth`), waits, at most
    /// [`LONGEST_ACCEPT_PAUSE`], so that the accept loop takes no
    /// connection meanwhile; returns when the wait began, if it waited, or
    /// on `stop`.
    ///
    /// Why: tokio runs the tasks a worker's own timers and sockets woke
    /// first, and reaches into the shared queue, where a task spawned on a
    /// full worker queue or woken from another thread goes, once in every
    /// few dozen polls. So once the server has more work than CPU, that
    /// queue grows and whatever lands there waits seconds, while a timer's
    /// task still runs on time: under issue 15's overload it held
    /// 6,000–13,000 tasks and each waited 3–5 s, while a timer's task ran
    /// 35–120 ms late. A new connection's task is among them: it was
    /// read after its client had given up (`handshake_timeout`), or its
    /// WELCOME came too late, and every such attempt cost the server an
    /// accept, a task, a store write and a close, and came back. A
    /// connection left in the listen backlog costs nothing; its client
    /// waits there instead of in our queue, and is read once the queue has
    /// drained.
    pub(crate) async fn wait_for_run_queue(
        &self,
        depth: impl Fn() -> usize,
        stop: &CancellationToken,
    ) -> Option<Instant> {
        let limit = self.limits.run_queue?;
        if depth() <= limit {
            return None;
        }
        let began = Instant::now();
        self.accept_paused.store(true, Ordering::Relaxed);
        while depth() > limit && began.elapsed() < LONGEST_ACCEPT_PAUSE {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(RUN_QUEUE_RECHECK) => {}
            }
        }
        self.accept_paused.store(false, Ordering::Relaxed);
        Some(began)
    }

    pub fn scheduling_lag(&self) -> Duration {
        Duration::from_nanos(self.lag_ns.load(Ordering::Relaxed))
    }

    pub fn store_latency(&self) -> Duration {
        Duration::from_nanos(self.store_ns.load(Ordering::Relaxed))
    }

    /// How long the lease renewals answered last had waited for the store
    /// (zero with an in-process store, or while none wait).
    pub fn renewal_lag(&self) -> Duration {
        Duration::from_nanos(self.renewal_lag_ns.load(Ordering::Relaxed))
    }

    /// The stream limit learned so far; `None` while the server has never
    /// run short.
    pub fn stream_limit(&self) -> Option<usize> {
        match self.stream_limit.load(Ordering::Relaxed) {
            usize::MAX => None,
            limit => Some(limit),
        }
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

    fn set_stream_limit(&self, limit: Option<usize>, streams: usize) {
        self.stream_limit
            .store(limit.unwrap_or(usize::MAX), Ordering::Relaxed);
        self.streams_sampled.store(streams, Ordering::Relaxed);
        self.update();
    }

    /// Share of new sessions to turn away by proportional shedding now: for
    /// each signal, how far past where shedding starts it is, as a
    /// fraction of that (all of them at twice it); the larger of the two.
    pub fn shedding(&self) -> f64 {
        let past = |value: Duration, from: Option<Duration>| match from {
            Some(from) if !from.is_zero() => {
                (value.as_secs_f64() / from.as_secs_f64() - 1.0).clamp(0.0, 1.0)
            }
            _ => 0.0,
        };
        let lag_from = self
            .limits
            .scheduling_lag
            .map(|target| target.saturating_mul(SHED_FROM_TARGETS));
        past(self.scheduling_lag(), lag_from)
            .max(past(self.store_latency(), self.limits.store_latency))
    }

    fn state(&self, streams: usize) -> Overloaded {
        Overloaded {
            scheduling_lag: self.scheduling_lag(),
            store_latency: self.store_latency(),
            at_stream_limit: self
                .stream_limit()
                .filter(|&limit| streams >= limit)
                .map(|limit| (streams, limit)),
            shedding: self.shedding(),
        }
    }

    fn update(&self) {
        let state = self.state(self.streams_sampled.load(Ordering::Relaxed));
        let now = state.at_stream_limit.is_some() || state.shedding > 0.0;
        if self.refusing.swap(now, Ordering::Relaxed) != now {
            if now {
                tracing::warn!(
                    scheduling_lag_ms = state.scheduling_lag.as_millis() as u64,
                    store_latency_ms = state.store_latency.as_millis() as u64,
                    stream_limit = self.stream_limit(),
                    "{state}: turning new sessions away until it passes (resumes are still served)"
                );
            } else {
                tracing::info!(
                    scheduling_lag_ms = state.scheduling_lag.as_millis() as u64,
                    store_latency_ms = state.store_latency.as_millis() as u64,
                    stream_limit = self.stream_limit(),
                    "no longer overloaded: admitting new sessions again"
                );
            }
        }
    }

    /// `Some` while new sessions are turned away (all of them at the
    /// stream limit, a share while shedding), as of the last probe.
    pub fn overloaded(&self) -> Option<Overloaded> {
        let state = self.state(self.streams_sampled.load(Ordering::Relaxed));
        (state.at_stream_limit.is_some() || state.shedding > 0.0).then_some(state)
    }

    /// Whether to admit one new session while `streams` sessions stream
    /// here, or why not, at once. The admitted OPEN counts against the
    /// limit until the returned guard goes, when its stream has started
    /// (or failed to). Past the limit every OPEN is refused; otherwise,
    /// over successive calls, the share refused is
    /// [`Overload::shedding`], spread evenly (the golden-ratio sequence),
    /// whoever asks.
    pub(crate) fn try_admit(&self, streams: usize) -> Result<Counted<'_>, Overloaded> {
        let opening = self.opening.fetch_add(1, Ordering::Relaxed);
        let admitted = Counted(&self.opening);
        let state = self.state(streams.saturating_add(opening));
        if state.at_stream_limit.is_some() {
            return Err(state);
        }
        if state.shedding > 0.0 {
            const GOLDEN: f64 = 0.618_033_988_749_894_9;
            let n = self.decided.fetch_add(1, Ordering::Relaxed);
            if (n as f64 * GOLDEN).fract() < state.shedding {
                return Err(state);
            }
        }
        Ok(admitted)
    }

    /// [`Overload::try_admit`], but an OPEN that finds the server at its
    /// stream limit waits up to `hold` for a place (streams end all the
    /// time) before it is refused, behind at most as many others as places
    /// can be expected to free meanwhile ([`Overload::hold_capacity`]).
    /// `streams` counts the streams now.
    ///
    /// Why wait rather than refuse at once: a refused client comes back,
    /// and an overloaded server has many of them. Each attempt costs a
    /// connection, a hello and an ERROR, so at twice its capacity a server
    /// that refused at once spent more of its core on refusals than on
    /// streams, and went under anyway (measured: the lag passed a second
    /// with the stream limit holding). A waiting OPEN costs a parked task
    /// and a socket, no CPU, takes a freed place within a probe interval,
    /// and its client comes back at most once per `hold` plus its backoff.
    /// `hold` stays well below the 5 s a client waits for its answer.
    pub(crate) async fn admit(
        &self,
        streams: impl Fn() -> usize,
        hold: Duration,
    ) -> Result<Counted<'_>, Overloaded> {
        let refused = match self.try_admit(streams()) {
            Ok(admitted) => return Ok(admitted),
            Err(state) if state.at_stream_limit.is_none() || hold.is_zero() => return Err(state),
            Err(state) => state,
        };
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.hold_capacity() {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(refused);
        }
        let _waiting = Counted(&self.waiting);
        let deadline = Instant::now() + hold;
        loop {
            if tokio::time::timeout_at(deadline, self.room.notified())
                .await
                .is_err()
            {
                // A place freed since the last probe is still a place.
                let last_chance = self.try_admit(streams());
                if last_chance.is_ok() {
                    self.held_admitted.fetch_add(1, Ordering::Relaxed);
                }
                return last_chance;
            }
            match self.try_admit(streams()) {
                Ok(admitted) => {
                    self.held_admitted.fetch_add(1, Ordering::Relaxed);
                    return Ok(admitted);
                }
                Err(state) if state.at_stream_limit.is_none() => return Err(state),
                // Someone else took the place (a resume, a racing OPEN).
                Err(_) => continue,
            }
        }
    }

    /// How many OPENs the hold takes at once: about as many as places
    /// freed for held OPENs over the last [`OPEN_HOLD`] (times
    /// [`HOLD_SLACK`]), at least [`HOLD_FLOOR`], at most the stream limit.
    ///
    /// Why bound it by the rate: a held OPEN that gets no place is refused
    /// at the end of its hold all the same, having cost a task, a timer and
    /// two trips through a runtime that is running late, and having kept
    /// its client from hearing so for 2 s. Bounded only by the limit, the
    /// hold could take thousands of OPENs per server while only as many as
    /// places free in 2 s can get one. The rest are better told at once,
    /// at the door (`crate::door`).
    pub(crate) fn hold_capacity(&self) -> usize {
        let per_second = self.hold_rate_milli.load(Ordering::Relaxed) as f64 / 1000.0;
        let expected = (per_second * OPEN_HOLD.as_secs_f64() * HOLD_SLACK) as usize;
        let limit = self.stream_limit().unwrap_or(usize::MAX);
        expected.max(HOLD_FLOOR).min(limit)
    }

    /// Whether an OPEN arriving now, with `streams` sessions streaming,
    /// would be refused without waiting: at the stream limit with the hold
    /// full, or shedding everything. `None` when it might be admitted or
    /// held; the ordinary path then decides (it is the one that spreads
    /// proportional shedding evenly, so partial shedding is left to it).
    pub(crate) fn refuses_at_once(&self, streams: usize) -> Option<Overloaded> {
        if !self.refusing.load(Ordering::Relaxed) {
            return None;
        }
        let opening = self.opening.load(Ordering::Relaxed);
        let state = self.state(streams.saturating_add(opening));
        let hold_full = self.waiting.load(Ordering::Relaxed) >= self.hold_capacity();
        let refused = (state.at_stream_limit.is_some() && hold_full) || state.shedding >= 1.0;
        refused.then_some(state)
    }

    /// Puts the server at a stream limit of 0 with a hold of 0, so that
    /// every OPEN is refused at once (the door's tests).
    #[cfg(test)]
    pub(crate) fn force_refusing_at_once(&self) {
        self.set_stream_limit(Some(0), 0);
    }

    /// Folds the held OPENs admitted since the last probe, `elapsed` ago,
    /// into their smoothed rate.
    fn sample_hold_rate(&self, elapsed: Duration) {
        let admitted = self.held_admitted.swap(0, Ordering::Relaxed) as f64;
        let seconds = elapsed.as_secs_f64();
        if seconds <= 0.0 {
            return;
        }
        let sample = admitted / seconds * 1000.0;
        let old = self.hold_rate_milli.load(Ordering::Relaxed) as f64;
        let new = old + HOLD_RATE_SMOOTHING * (sample - old);
        self.hold_rate_milli.store(new as u64, Ordering::Relaxed);
    }

    /// Wakes one waiting OPEN per free place under the stream limit.
    fn hand_out_room(&self, streams: usize) {
        let Some(limit) = self.stream_limit() else {
            // No limit (any more): everyone may go.
            self.room.notify_waiters();
            return;
        };
        let taken = streams.saturating_add(self.opening.load(Ordering::Relaxed));
        let free = limit.saturating_sub(taken);
        for _ in 0..free.min(self.waiting.load(Ordering::Relaxed)) {
            self.room.notify_one();
        }
    }

    /// Every [`PROBE_EVERY`] until `stop` (the server's shutdown): measures
    /// the runtime's scheduling lag (how much later than asked a timer's
    /// task got to run, which is how late every other task runs too),
    /// moves the stream limit, and reads the store's latency, if the store
    /// measures it. (Not until the last `Arc` goes: `/readyz` keeps one for
    /// as long as the process serves it.)
    pub(crate) fn spawn_probe(
        self: &Arc<Self>,
        store: Arc<dyn SessionStore>,
        telemetry: Telemetry,
        stop: CancellationToken,
    ) {
        if self.limits == OverloadLimits::OFF {
            return;
        }
        let overload = self.clone();
        let floor = self.limits.stream_floor;
        let mut limit = self
            .limits
            .scheduling_lag
            .map(|target| StreamLimit::new(target, floor));
        tokio::spawn(async move {
            let mut last = Instant::now();
            let mut reported = LimitReport::default();
            loop {
                let asked = Instant::now() + PROBE_EVERY;
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep_until(asked) => {}
                }
                let now = Instant::now();
                let lag = now.saturating_duration_since(asked);
                if let Some(latency) = store.latency() {
                    overload.set_store_latency(latency);
                }
                overload.record_lag(lag);
                let streams = telemetry.streaming_now();
                // Leases are a cost of every stream too: a store that
                // renews them later and later (Redis short of CPU) carries
                // fewer streams than the core does, and past the lease's
                // margin every stream it was late for stops.
                let renewals = store.renewal_lag().unwrap_or_default();
                overload
                    .renewal_lag_ns
                    .store(to_ns(renewals), Ordering::Relaxed);
                let learned = limit.as_mut().and_then(|limit| {
                    let behind = lag.max(limit.renewal_wait_as_lag(renewals));
                    limit.on_sample(behind, now - last, streams)
                });
                overload.set_stream_limit(learned, streams);
                overload.sample_hold_rate(now - last);
                overload.hand_out_room(streams);
                reported.maybe_log(now, learned, streams, overload.scheduling_lag());
                last = now;
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

    const TICK: Duration = PROBE_EVERY;

    #[test]
    fn sheds_in_proportion_to_how_far_past_its_threshold_it_is() {
        // Lag target 100 ms: shedding from 500 ms, everyone at 1 s.
        let overload = Overload::new(OverloadLimits {
            scheduling_lag: Some(ms(100)),
            store_latency: Some(ms(500)),
            ..OverloadLimits::default()
        });
        for _ in 0..50 {
            overload.record_lag(ms(10));
        }
        assert_eq!(overload.overloaded(), None);
        assert!((0..1000).all(|_| overload.try_admit(0).is_ok()));
        // Smoothed to about 750 ms: half past the threshold, half turned away.
        for _ in 0..100 {
            overload.record_lag(ms(750));
        }
        let why = overload.overloaded().expect("overloaded");
        assert!((why.shedding - 0.5).abs() < 0.01, "{why}");
        let refused = (0..1000).filter(|_| overload.try_admit(0).is_err()).count();
        assert!((490..=510).contains(&refused), "{refused} of 1000 refused");
        // Twice the threshold or more: everyone.
        for _ in 0..100 {
            overload.record_lag(ms(5_000));
        }
        assert!((0..100).all(|_| overload.try_admit(0).is_err()));
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
        let mut limit = StreamLimit::new(ms(100), StreamLimit::FLOOR);
        assert_eq!(limit.on_sample(ms(150), TICK, 50_000), None);
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

    #[test]
    fn a_healthy_server_has_no_stream_limit() {
        let mut limit = StreamLimit::new(ms(100), StreamLimit::FLOOR);
        for streams in (0..200_000).step_by(1_000) {
            assert_eq!(limit.on_sample(ms(30), TICK, streams), None);
        }
    }

    #[test]
    fn the_stream_limit_is_cut_from_the_streams_and_does_not_compound() {
        let mut limit = StreamLimit::new(ms(100), StreamLimit::FLOOR);
        assert_eq!(limit.on_sample(ms(5), TICK, 20_000), None);
        // The lag passes its target (smoothed over a few samples): 90% of
        // the streams running then.
        limit.on_sample(ms(400), TICK, 20_000);
        assert_eq!(limit.on_sample(ms(400), TICK, 20_000), Some(18_000));
        // Still late, same streams: no further cut (a cut takes no load
        // off; only the sessions ending do).
        for _ in 0..100 {
            assert_eq!(limit.on_sample(ms(900), TICK, 20_000), Some(18_000));
        }
        // Still late while sessions end by themselves: the load is falling
        // already, so the limit stays where it is.
        for streams in (5_000..=17_000).rev().step_by(1_000) {
            assert_eq!(limit.on_sample(ms(900), TICK, streams), Some(18_000));
        }
        // Still late with the streams back at the limit: cut again, from
        // the limit, but at most once per spacing.
        assert_eq!(limit.on_sample(ms(900), TICK, 18_000), Some(16_200));
        assert_eq!(limit.on_sample(ms(900), TICK, 16_200), Some(16_200));
        let samples_per_spacing = StreamLimit::CUT_SPACING.as_millis() / TICK.as_millis();
        for _ in 2..samples_per_spacing {
            assert_eq!(limit.on_sample(ms(900), TICK, 16_200), Some(16_200));
        }
        assert_eq!(limit.on_sample(ms(900), TICK, 16_200), Some(14_580));
        // Never below the floor, however late.
        let mut small = StreamLimit::new(ms(100), StreamLimit::FLOOR);
        small.on_sample(ms(900), TICK, 1_100);
        assert_eq!(
            small.on_sample(ms(900), TICK, 1_100),
            Some(StreamLimit::FLOOR)
        );
        assert_eq!(small.on_sample(ms(900), TICK, 10), Some(StreamLimit::FLOOR));
    }

    #[test]
    fn the_floor_is_the_configured_one() {
        let mut limit = StreamLimit::new(ms(100), 5);
        limit.on_sample(ms(400), TICK, 20);
        assert_eq!(limit.on_sample(ms(400), TICK, 20), Some(18));
        let mut cut_to_floor = StreamLimit::new(ms(100), 5);
        cut_to_floor.on_sample(ms(400), TICK, 6);
        assert_eq!(cut_to_floor.on_sample(ms(400), TICK, 6), Some(5));
        let mut none_below = StreamLimit::new(ms(100), 5);
        for _ in 0..10 {
            assert_eq!(none_below.on_sample(ms(400), TICK, 5), None);
        }
    }

    #[test]
    fn the_stream_limit_grows_only_while_healthy_and_holding_admissions_back() {
        let mut limit = StreamLimit::new(ms(100), StreamLimit::FLOOR);
        for _ in 0..3 {
            limit.on_sample(ms(500), TICK, 10_000);
        }
        assert_eq!(limit.limit(), Some(9_000));
        // The lag falls back (over a few samples, the streams unchanged).
        for _ in 0..5 {
            limit.on_sample(ms(1), TICK, 10_000);
        }
        assert!(limit.limit() > Some(9_000), "{:?}", limit.limit());
        let mut limit = StreamLimit {
            limit: Some(9_000),
            ..limit
        };
        // Healthy but far below the limit: no growth.
        for _ in 0..50 {
            limit.on_sample(ms(1), TICK, 5_000);
        }
        assert_eq!(limit.limit(), Some(9_000));
        // Healthy and at the limit: about 2% a second while the lag is
        // near its target...
        let mut near = StreamLimit {
            limit: Some(9_000),
            lag: ms(50),
            ..limit.clone()
        };
        for _ in 0..10 {
            near.on_sample(ms(50), TICK, 9_000);
        }
        let grown = near.limit().expect("a limit");
        assert!(
            (9_170..=9_190).contains(&grown),
            "grew to {grown} in a second"
        );
        // ... and about 10% a second while it is far below (the streams
        // filling each new place at once).
        for _ in 0..10 {
            let streams = limit.limit().expect("a limit");
            limit.on_sample(ms(1), TICK, streams);
        }
        let grown = limit.limit().expect("a limit");
        assert!(
            (9_900..=9_950).contains(&grown),
            "grew to {grown} in a second"
        );
    }

    #[test]
    fn admission_stops_at_the_stream_limit_counting_opens_in_flight() {
        let overload = Overload::new(OverloadLimits::default());
        overload.set_stream_limit(Some(2_000), 1_998);
        let first = overload.try_admit(1_998).expect("room for two");
        let second = overload.try_admit(1_998).expect("room for one more");
        let why = overload
            .try_admit(1_998)
            .expect_err("two OPENs in flight fill the last two places");
        assert_eq!(why.at_stream_limit, Some((2_000, 2_000)), "{why}");
        assert!(why.to_string().contains("streaming 2000 sessions"), "{why}");
        drop((first, second));
        // Their streams started (or failed): the count passed in is exact.
        assert!(overload.try_admit(1_999).is_ok());
        assert!(overload.try_admit(2_000).is_err());
        // /readyz and the gauge see the limit from the last probe.
        overload.set_stream_limit(Some(2_000), 2_000);
        assert!(overload.overloaded().is_some());
        overload.set_stream_limit(Some(2_000), 1_500);
        assert_eq!(overload.overloaded(), None);
    }

    #[test]
    fn the_hold_takes_about_as_many_opens_as_places_free_during_it() {
        let overload = Overload::new(OverloadLimits::default());
        overload.set_stream_limit(Some(10_000), 10_000);
        assert_eq!(overload.hold_capacity(), HOLD_FLOOR, "no rate seen yet");
        // Held OPENs get places at 100 a second, long enough to count.
        for _ in 0..100 {
            overload.held_admitted.store(10, Ordering::Relaxed);
            overload.sample_hold_rate(ms(100));
        }
        // 100 a second, over a 2 s hold, with twice the room.
        let capacity = overload.hold_capacity();
        assert!((380..=400).contains(&capacity), "{capacity}");
        overload.set_stream_limit(Some(300), 300);
        assert_eq!(overload.hold_capacity(), 300, "never more than the limit");
    }

    #[test]
    fn an_open_is_refused_at_once_only_at_the_limit_with_the_hold_full_or_when_shedding_all() {
        let overload = Overload::new(OverloadLimits::default());
        assert_eq!(overload.refuses_at_once(5_000), None, "healthy");
        overload.set_stream_limit(Some(2_000), 2_000);
        assert_eq!(overload.refuses_at_once(1_000), None, "under the limit");
        assert_eq!(
            overload.refuses_at_once(2_000),
            None,
            "at the limit, the hold has room"
        );
        overload.waiting.store(HOLD_FLOOR, Ordering::Relaxed);
        let refused = overload
            .refuses_at_once(2_000)
            .expect("at the limit with the hold full");
        assert_eq!(refused.at_stream_limit, Some((2_000, 2_000)));
        assert_eq!(
            refused.refusal().code,
            numstream_protocol::ErrorCode::ServerBusy
        );
        // Shedding everything, even under the limit (the lag at ten times
        // its target: twice where shedding starts).
        overload.waiting.store(0, Ordering::Relaxed);
        overload.set_stream_limit(None, 100);
        overload.lag_ns.store(to_ns(ms(5_000)), Ordering::Relaxed);
        overload.update();
        assert!(overload.refuses_at_once(100).is_some(), "shedding all");
        // Shedding a share is left to the ordinary path, which spreads it.
        overload.lag_ns.store(to_ns(ms(3_000)), Ordering::Relaxed);
        overload.update();
        assert!(overload.shedding() > 0.0 && overload.shedding() < 1.0);
        assert_eq!(overload.refuses_at_once(100), None, "shedding a share");
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_at_the_limit_waits_for_a_place_then_is_refused() {
        use std::sync::atomic::AtomicUsize;
        let overload = Arc::new(Overload::new(OverloadLimits::default()));
        let streams = Arc::new(AtomicUsize::new(2_000));
        overload.set_stream_limit(Some(2_000), 2_000);
        let waiter = |overload: Arc<Overload>, streams: Arc<AtomicUsize>| {
            tokio::spawn(async move {
                let started = Instant::now();
                let admitted = overload
                    .admit(|| streams.load(Ordering::Relaxed), OPEN_HOLD)
                    .await
                    .is_ok();
                (admitted, started.elapsed())
            })
        };
        let first = waiter(overload.clone(), streams.clone());
        let second = waiter(overload.clone(), streams.clone());
        tokio::time::sleep(ms(500)).await;
        // One stream ends: the probe hands its place to the first waiter.
        streams.store(1_999, Ordering::Relaxed);
        overload.hand_out_room(1_999);
        let (admitted, waited) = first.await.expect("task");
        assert!(admitted, "the first waiter got the freed place");
        assert_eq!(waited, ms(500));
        // The place is taken again (its stream started); nothing else frees.
        streams.store(2_000, Ordering::Relaxed);
        let (admitted, waited) = second.await.expect("task");
        assert!(!admitted, "no place freed for the second waiter");
        assert_eq!(waited, OPEN_HOLD);
        // Without a hold, refused at once.
        let refused = overload
            .admit(|| 2_000, Duration::ZERO)
            .await
            .expect_err("at the limit");
        assert_eq!(refused.at_stream_limit, Some((2_000, 2_000)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_accept_loop_waits_while_the_run_queue_is_deeper_than_its_limit() {
        let overload = Arc::new(Overload::new(OverloadLimits {
            run_queue: Some(100),
            ..OverloadLimits::default()
        }));
        let stop = CancellationToken::new();
        let depth = Arc::new(AtomicUsize::new(100));
        let queue = || {
            let depth = depth.clone();
            move || depth.load(Ordering::Relaxed)
        };
        assert_eq!(
            overload.wait_for_run_queue(queue(), &stop).await,
            None,
            "at the limit: no wait"
        );
        depth.store(101, Ordering::Relaxed);
        let started = Instant::now();
        let waiting = tokio::spawn({
            let (overload, stop, queue) = (overload.clone(), stop.clone(), queue());
            async move { overload.wait_for_run_queue(queue, &stop).await }
        });
        tokio::time::sleep(ms(500)).await;
        assert_eq!(overload.accept_paused(), Some(100), "paused while deep");
        assert!(!waiting.is_finished(), "returned while the queue was deep");
        depth.store(10, Ordering::Relaxed);
        let began = waiting.await.expect("task").expect("it waited");
        assert_eq!(began, started, "reports when the wait began");
        assert!(started.elapsed() >= ms(500));
        assert_eq!(overload.accept_paused(), None, "resumed once drained");

        // A queue that stays deep: the wait ends after the longest pause.
        depth.store(1_000, Ordering::Relaxed);
        let started = Instant::now();
        assert!(overload.wait_for_run_queue(queue(), &stop).await.is_some());
        let waited = started.elapsed();
        assert!(
            waited >= LONGEST_ACCEPT_PAUSE && waited < LONGEST_ACCEPT_PAUSE + ms(100),
            "waited {waited:?} for a queue that never drained"
        );

        // A stop ends the wait however deep the queue.
        depth.store(1_000, Ordering::Relaxed);
        stop.cancel();
        assert!(overload.wait_for_run_queue(queue(), &stop).await.is_some());
        // Off: never waits.
        let off = Overload::new(OverloadLimits::OFF);
        assert_eq!(off.wait_for_run_queue(queue(), &stop).await, None);
    }

    /// Lease renewals waiting long for the store set a stream limit as the
    /// scheduling lag does: the store, not the core, is what these streams
    /// have run short of (Redis starved of CPU, issue 15's 100,000-session
    /// run, where 40,715 streams stopped on renewals answered too late).
    #[tokio::test]
    async fn renewals_waiting_for_the_store_set_a_stream_limit() {
        let overload = Arc::new(Overload::new(OverloadLimits {
            stream_floor: 10,
            ..OverloadLimits::default()
        }));
        let store = Arc::new(crate::test_store::TestStore::default());
        let telemetry = Telemetry::disabled();
        let _streams: Vec<_> = (0..50).map(|_| telemetry.session_attached()).collect();
        assert_eq!(telemetry.streaming_now(), 50);
        let stop = CancellationToken::new();
        overload.spawn_probe(store.clone(), telemetry, stop.clone());
        // Renewals answered at once, or within their own target: no limit.
        tokio::time::sleep(PROBE_EVERY * 5).await;
        store.renewal_lag_ms.store(1_500, Ordering::Relaxed);
        tokio::time::sleep(PROBE_EVERY * 5).await;
        assert_eq!(overload.stream_limit(), None);
        // Renewals answered 5 s after they were asked: past their 2 s
        // target, the limit is cut to 90% of the streams.
        store.renewal_lag_ms.store(5_000, Ordering::Relaxed);
        numstream_harness::wait::until_sync(Duration::from_secs(5), "a stream limit", || {
            overload.stream_limit().is_some()
        })
        .await;
        assert_eq!(overload.stream_limit(), Some(45));
        assert_eq!(
            overload.renewal_lag(),
            Duration::from_secs(5),
            "for /metrics"
        );
        stop.cancel();
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
            // Target 20 ms: shedding from 100 ms.
            let overload = Arc::new(Overload::new(OverloadLimits {
                scheduling_lag: Some(ms(20)),
                store_latency: None,
                ..OverloadLimits::default()
            }));
            overload.spawn_probe(
                Arc::new(numstream_store::InMemoryStore::new(1)),
                Telemetry::disabled(),
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
