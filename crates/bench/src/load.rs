//! The client side of every scenario: many sessions at once, each verified
//! (numstream: the client library's checksum check, `Report::ok`; bare:
//! every index and value), measured by a [`Probe`]. A [`Load`] is plain
//! data so that a share of it can run in another process of this binary
//! (`numstream-bench worker`), past the per-process descriptor limit.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::probe::{Probe, SessionPath};
use crate::proxy::CutSwitch;
use crate::servers::Flavor;
use crate::stats::{HistData, Shards};

/// Errors kept verbatim per load; the rest are only counted.
const KEPT_ERRORS: usize = 5;

/// What one process of the load generator runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Load {
    pub(crate) flavor: Flavor,
    /// Servers; session `i` goes to `addrs[i % len]`.
    pub(crate) addrs: Vec<SocketAddr>,
    /// Source addresses, round robin (empty: the kernel's choice).
    pub(crate) sources: Vec<IpAddr>,
    /// The CA the `numstream-tls` servers' certificate chains to.
    pub(crate) tls_ca: Option<PathBuf>,
    /// Client TLS trusting `tls_ca`, made once per process by [`run`] and
    /// shared by all its sessions (as one client program shares it across
    /// its reconnections).
    #[serde(skip)]
    pub(crate) client_tls: Option<numstream_client::ClientTls>,
    pub(crate) kind: LoadKind,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum LoadKind {
    /// Sessions `first..first + sessions` of `total`, session `i` starting
    /// at `start + ramp_up * i / total`; plus `victims` sessions whose
    /// connections are cut `drops` times each.
    Steady {
        total: usize,
        first: usize,
        sessions: usize,
        count: u16,
        interval_us: u64,
        ramp_up_ms: u64,
        /// Wall-clock start (ms since the epoch), shared by all processes.
        start_unix_ms: u64,
        victims: usize,
        drops: u32,
    },
    /// `parallel` sessions of `count` numbers at once (interval 0).
    Burst { parallel: usize, count: u16 },
    /// `concurrency` loops of back-to-back `count`-number sessions for
    /// `duration_ms`.
    Churn {
        concurrency: usize,
        count: u16,
        duration_ms: u64,
    },
}

/// What a load measured. Merged across processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct LoadResult {
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    pub(crate) errors: Vec<String>,
    pub(crate) numbers: u64,
    pub(crate) lateness: HistData,
    pub(crate) resume: HistData,
    /// Whole-session durations.
    pub(crate) sessions: HistData,
    pub(crate) wall_s: f64,
    pub(crate) outcomes: Outcomes,
    /// How late the load generator's own runtime ran a 100 ms timer, over
    /// the load: its clients read, time out and send that much later than
    /// they mean to, so a run where this is high measures the load
    /// generator as much as the server (issue 15's one-core runs, where
    /// it shared a saturated core with Redis).
    pub(crate) own_lag: HistData,
}

/// How the sessions got to their end, beyond verified or not (sessions the
/// load generator cuts on purpose, `resume`'s victims, left out). A session
/// is in at most one of `refused_*` and at most one of `lost_after_welcome`,
/// `recovered_after_welcome` and `never_welcomed`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Outcomes {
    /// Got at least one WELCOME (bare: one frame).
    pub(crate) welcomed: u64,
    /// Refused with `server_busy` before their first WELCOME, then
    /// welcomed: admission control doing its job.
    pub(crate) refused_then_served: u64,
    /// Refused with `server_busy` and never welcomed.
    pub(crate) refused_never_served: u64,
    /// Welcomed, then lost their stream at least once (the server closed
    /// it, refused the RESUME, went silent...), but verified in the end
    /// after resuming: a failure after admission that a retry repaired.
    pub(crate) recovered_after_welcome: u64,
    /// Welcomed and never verified: the collapse.
    pub(crate) lost_after_welcome: u64,
    /// Never welcomed and not verified (for any reason, busy or not).
    pub(crate) never_welcomed: u64,
    /// Streams lost after a WELCOME, all sessions together.
    pub(crate) interruptions: u64,
    /// Why streams were lost after a WELCOME, by kind (`probe::cause_kind`).
    pub(crate) interruption_causes: BTreeMap<String, u64>,
    /// Why attempts before the first WELCOME failed, by kind.
    pub(crate) admission_causes: BTreeMap<String, u64>,
}

impl Outcomes {
    /// Adds one finished session.
    fn count(&mut self, path: &SessionPath, verified: bool) {
        if path.refused_busy {
            if path.welcomed {
                self.refused_then_served += 1;
            } else {
                self.refused_never_served += 1;
            }
        }
        if path.welcomed {
            self.welcomed += 1;
            if !verified {
                self.lost_after_welcome += 1;
            } else if !path.interruptions.is_empty() {
                self.recovered_after_welcome += 1;
            }
        } else if !verified {
            self.never_welcomed += 1;
        }
        self.interruptions += path.interruptions.len() as u64;
        for kind in &path.interruptions {
            *self
                .interruption_causes
                .entry((*kind).to_owned())
                .or_default() += 1;
        }
        for kind in &path.admission_causes {
            *self.admission_causes.entry((*kind).to_owned()).or_default() += 1;
        }
    }

    /// Sessions that failed after their WELCOME, repaired or not: the
    /// figure the overload issue wants at zero.
    pub(crate) fn failed_after_welcome(&self) -> u64 {
        self.recovered_after_welcome + self.lost_after_welcome
    }

    fn merge(&mut self, other: &Outcomes) {
        self.welcomed += other.welcomed;
        self.refused_then_served += other.refused_then_served;
        self.refused_never_served += other.refused_never_served;
        self.recovered_after_welcome += other.recovered_after_welcome;
        self.lost_after_welcome += other.lost_after_welcome;
        self.never_welcomed += other.never_welcomed;
        self.interruptions += other.interruptions;
        for (into, from) in [
            (&mut self.interruption_causes, &other.interruption_causes),
            (&mut self.admission_causes, &other.admission_causes),
        ] {
            for (kind, n) in from {
                *into.entry(kind.clone()).or_default() += n;
            }
        }
    }
}

impl LoadResult {
    pub(crate) fn merge(&mut self, other: &LoadResult) {
        self.ok += other.ok;
        self.failed += other.failed;
        for error in &other.errors {
            if self.errors.len() < KEPT_ERRORS {
                self.errors.push(error.clone());
            }
        }
        self.numbers += other.numbers;
        self.lateness.merge(&other.lateness);
        self.resume.merge(&other.resume);
        self.sessions.merge(&other.sessions);
        self.wall_s = self.wall_s.max(other.wall_s);
        self.outcomes.merge(&other.outcomes);
        self.own_lag.merge(&other.own_lag);
    }
}

/// Shared by every session task of one load.
#[derive(Debug)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    numbers: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
    outcomes: std::sync::Mutex<Outcomes>,
    lateness: Shards,
    resume: Shards,
    sessions: Shards,
    own_lag: Shards,
}

impl Tally {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            numbers: AtomicU64::new(0),
            errors: std::sync::Mutex::new(Vec::new()),
            outcomes: std::sync::Mutex::new(Outcomes::default()),
            lateness: Shards::new(),
            resume: Shards::new(),
            sessions: Shards::new(),
            own_lag: Shards::new(),
        })
    }

    fn finish(&self, shard: usize, started: Instant, probe: &Probe, result: Result<(), String>) {
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .count(&probe.path, result.is_ok());
        self.finish_cut(shard, started, probe, result);
    }

    /// [`Self::finish`] for a session whose connections the load generator
    /// cut on purpose: its lost streams are not the server's failures, so
    /// it stays out of [`Outcomes`].
    fn finish_cut(
        &self,
        shard: usize,
        started: Instant,
        probe: &Probe,
        result: Result<(), String>,
    ) {
        self.numbers.fetch_add(probe.numbers, Ordering::Relaxed);
        self.sessions.record(shard, started.elapsed());
        match result {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
                if errors.len() < KEPT_ERRORS {
                    errors.push(error);
                }
            }
        }
    }

    fn result(&self, wall: Duration) -> LoadResult {
        LoadResult {
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            errors: self
                .errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            numbers: self.numbers.load(Ordering::Relaxed),
            lateness: self.lateness.data(),
            resume: self.resume.data(),
            sessions: self.sessions.data(),
            wall_s: wall.as_secs_f64(),
            outcomes: self
                .outcomes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            own_lag: self.own_lag.data(),
        }
    }
}

/// How often the load generator samples its own lag.
const OWN_LAG_EVERY: Duration = Duration::from_millis(100);

/// Samples how late this runtime runs a timer, every [`OWN_LAG_EVERY`],
/// until aborted.
async fn sample_own_lag(tally: Arc<Tally>) {
    loop {
        let asked = Instant::now() + OWN_LAG_EVERY;
        tokio::time::sleep_until(asked).await;
        tally
            .own_lag
            .record(0, Instant::now().saturating_duration_since(asked));
    }
}

/// One session of either flavor, verified; returns the numbers received.
async fn session(
    load: &Load,
    index: usize,
    addr: SocketAddr,
    count: u16,
    interval: Duration,
    probe: &mut Probe<'_>,
) -> Result<(), String> {
    let source = (!load.sources.is_empty()).then(|| load.sources[index % load.sources.len()]);
    match load.flavor {
        Flavor::Bare => crate::bare::session(addr, source, count, interval, probe).await,
        Flavor::Numstream | Flavor::NumstreamTls => {
            let tls = match (load.flavor, &load.client_tls) {
                (Flavor::NumstreamTls, None) => {
                    return Err("no client TLS for numstream-tls".into());
                }
                (Flavor::NumstreamTls, tls) => tls.clone(),
                _ => None,
            };
            let config = numstream_client::ClientConfig {
                host: addr.ip().to_string(),
                ports: vec![addr.port()],
                count,
                local_addr: source,
                tls,
                ..Default::default()
            };
            let report = numstream_client::run(config, probe).await;
            match (report.ok, report.error) {
                (true, _) => Ok(()),
                (false, Some(error)) => Err(error.to_string()),
                (false, None) => Err("not verified".to_owned()),
            }
        }
    }
}

/// Runs `load` to the end in this process.
pub(crate) async fn run(mut load: Load) -> LoadResult {
    if let Some(ca) = &load.tls_ca {
        let options = numstream_client::TlsOptions {
            ca: Some(ca.clone()),
            ..Default::default()
        };
        match numstream_client::ClientTls::new(&options) {
            Ok(tls) => load.client_tls = Some(tls),
            Err(error) => {
                return LoadResult {
                    failed: 1,
                    errors: vec![format!("client TLS from {}: {error}", ca.display())],
                    ..Default::default()
                };
            }
        }
    }
    let load = Arc::new(load);
    let tally = Tally::new();
    let began = Instant::now();
    let own_lag = tokio::spawn(sample_own_lag(tally.clone()));
    let mut tasks = JoinSet::new();
    match load.kind.clone() {
        LoadKind::Steady {
            total,
            first,
            sessions,
            count,
            interval_us,
            ramp_up_ms,
            start_unix_ms,
            victims,
            drops,
        } => {
            let interval = Duration::from_micros(interval_us);
            let start = instant_of_unix_ms(start_unix_ms);
            let ramp_up = Duration::from_millis(ramp_up_ms);
            for i in first..first + sessions {
                let at = start + ramp_up.mul_f64(i as f64 / total.max(1) as f64);
                let (load, tally) = (load.clone(), tally.clone());
                let addr = load.addrs[i % load.addrs.len()];
                tasks.spawn(async move {
                    tokio::time::sleep_until(at).await;
                    let started = Instant::now();
                    let mut probe = Probe::new(i, interval, Some(&tally.lateness));
                    let result = session(&load, i, addr, count, interval, &mut probe).await;
                    tally.finish(i, started, &probe, result);
                });
            }
            for v in 0..victims {
                let at = start + ramp_up.mul_f64(v as f64 / victims as f64);
                let (load, tally) = (load.clone(), tally.clone());
                let addr = load.addrs[v % load.addrs.len()];
                tasks.spawn(async move {
                    tokio::time::sleep_until(at).await;
                    let started = Instant::now();
                    let switch = match CutSwitch::start(addr).await {
                        Ok(switch) => Arc::new(switch),
                        Err(error) => {
                            let error = Err(format!("starting a cut proxy: {error}"));
                            let probe = Probe::new(v, interval, None);
                            return tally.finish_cut(v, started, &probe, error);
                        }
                    };
                    let cutter = tokio::spawn(cut_repeatedly(switch.clone(), drops));
                    let mut probe =
                        Probe::new(v, interval, None).with_resume(&switch, &tally.resume);
                    let result =
                        session(&load, v, switch.addr(), count, interval, &mut probe).await;
                    cutter.abort();
                    tally.finish_cut(v, started, &probe, result);
                });
            }
        }
        LoadKind::Burst { parallel, count } => {
            for i in 0..parallel {
                let (load, tally) = (load.clone(), tally.clone());
                let addr = load.addrs[i % load.addrs.len()];
                tasks.spawn(async move {
                    let started = Instant::now();
                    let mut probe = Probe::new(i, Duration::ZERO, None);
                    let result = session(&load, i, addr, count, Duration::ZERO, &mut probe).await;
                    tally.finish(i, started, &probe, result);
                });
            }
        }
        LoadKind::Churn {
            concurrency,
            count,
            duration_ms,
        } => {
            let deadline = began + Duration::from_millis(duration_ms);
            for worker in 0..concurrency {
                let (load, tally) = (load.clone(), tally.clone());
                tasks.spawn(async move {
                    let mut i = worker;
                    while Instant::now() < deadline {
                        let addr = load.addrs[i % load.addrs.len()];
                        let started = Instant::now();
                        let mut probe = Probe::new(worker, Duration::ZERO, None);
                        let result =
                            session(&load, i, addr, count, Duration::ZERO, &mut probe).await;
                        tally.finish(worker, started, &probe, result);
                        i += concurrency;
                    }
                });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    own_lag.abort();
    tally.result(began.elapsed())
}

/// Cuts a victim's connection `drops` times, each 1 to 3 s after it is
/// streaming again, so every cut lands mid-stream.
async fn cut_repeatedly(switch: Arc<CutSwitch>, drops: u32) {
    let mut done = 0;
    while done < drops {
        let wait = Duration::from_millis(rand::rng().random_range(1000..3000));
        tokio::time::sleep(wait).await;
        if switch.cut() {
            done += 1;
        }
    }
}

pub(crate) fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The monotonic instant of a wall-clock time, so processes share a start.
pub(crate) fn instant_of_unix_ms(unix_ms: u64) -> Instant {
    let now_ms = unix_ms_now();
    let now = Instant::now();
    if unix_ms >= now_ms {
        now + Duration::from_millis(unix_ms - now_ms)
    } else {
        now.checked_sub(Duration::from_millis(now_ms - unix_ms))
            .unwrap_or(now)
    }
}
