//! The client side of every scenario: many sessions at once, each verified
//! (numstream: the client library's checksum check, `Report::ok`; bare:
//! every index and value), measured by a [`Probe`]. A [`Load`] is plain
//! data so that a share of it can run in another process of this binary
//! (`numstream-bench worker`), past the per-process descriptor limit.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::probe::Probe;
use crate::proxy::CutProxy;
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
    }
}

/// Shared by every session task of one load.
#[derive(Debug)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    numbers: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
    lateness: Shards,
    resume: Shards,
    sessions: Shards,
}

impl Tally {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            numbers: AtomicU64::new(0),
            errors: std::sync::Mutex::new(Vec::new()),
            lateness: Shards::new(),
            resume: Shards::new(),
            sessions: Shards::new(),
        })
    }

    fn finish(&self, shard: usize, started: Instant, numbers: u64, result: Result<(), String>) {
        self.numbers.fetch_add(numbers, Ordering::Relaxed);
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
        }
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
        Flavor::Numstream => {
            let config = numstream_client::ClientConfig {
                host: addr.ip().to_string(),
                ports: vec![addr.port()],
                count,
                local_addr: source,
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
pub(crate) async fn run(load: Load) -> LoadResult {
    let load = Arc::new(load);
    let tally = Tally::new();
    let began = Instant::now();
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
                    tally.finish(i, started, probe.numbers, result);
                });
            }
            for v in 0..victims {
                let at = start + ramp_up.mul_f64(v as f64 / victims as f64);
                let (load, tally) = (load.clone(), tally.clone());
                let addr = load.addrs[v % load.addrs.len()];
                tasks.spawn(async move {
                    tokio::time::sleep_until(at).await;
                    let started = Instant::now();
                    let proxy = match CutProxy::start(addr).await {
                        Ok(proxy) => proxy,
                        Err(error) => {
                            let error = Err(format!("starting a cut proxy: {error}"));
                            return tally.finish(v, started, 0, error);
                        }
                    };
                    let cutter = tokio::spawn(cut_repeatedly(proxy.switch.clone(), drops));
                    let mut probe =
                        Probe::new(v, interval, None).with_resume(&proxy.switch, &tally.resume);
                    let result = session(&load, v, proxy.addr, count, interval, &mut probe).await;
                    cutter.abort();
                    tally.finish(v, started, probe.numbers, result);
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
                    tally.finish(i, started, probe.numbers, result);
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
                        tally.finish(worker, started, probe.numbers, result);
                        i += concurrency;
                    }
                });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    tally.result(began.elapsed())
}

/// Cuts a victim's connection `drops` times, each 1 to 3 s after it is
/// streaming again, so every cut lands mid-stream.
async fn cut_repeatedly(switch: Arc<crate::proxy::CutSwitch>, drops: u32) {
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
