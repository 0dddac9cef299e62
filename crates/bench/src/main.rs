//! `numstream-bench`: the numstream load generator.
//!
//! Every scenario runs twice, first against the bare baseline (a minimal
//! tokio server writing same-sized frames on the same schedule, see
//! `bare.rs`), then against numstream, under the same load and in the same
//! run, and reports both side by side with their ratio; with `--tls`
//! numstream runs a third time over TLS, reported next to plaintext with
//! the ratio TLS / plaintext. Every numstream
//! session is verified by the client library (`Report::ok`), every bare one
//! frame by frame. BENCHMARKS.md has the commands that reproduce each
//! target of the performance issue and their last results; `overload`
//! (servers confined to fewer CPUs than they need) is in `overload.rs`.

mod bare;
mod cpus;
mod load;
mod metrics;
mod overload;
mod plot;
mod probe;
mod procfs;
mod proxy;
mod redis_watch;
mod report;
mod server_log;
mod servers;
mod stats;
mod timeline;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio::time::sleep_until;

use cpus::CpuList;
use load::{Load, LoadKind, LoadResult};
use metrics::MetricsSum;
use procfs::{Conditions, ProcSample};
use report::{FlavorReport, Report, ServerUsage, Target};
use servers::{Flavor, ServerOptions, Servers};

/// Load generator for numstream, measured against a bare tokio baseline.
#[derive(Debug, Parser)]
#[command(
    after_help = "Examples:\n  numstream-bench steady --sessions 19000 --count 40 --ramp-up 10s\n  numstream-bench burst --parallel 100\n  numstream-bench churn --concurrency 64 --duration 10s\n  numstream-bench resume --sessions 10000 --victims 100\n  numstream-bench overload --sessions 80000 --servers 5 --count 40 --ramp-up 25s --server-cpus 0\n\nBuild both binaries first: cargo build --release -p numstream-server-cli -p numstream-bench"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// C sessions at interval I, started over a ramp-up; lateness, server
    /// CPU and RSS per session over the window when all are connected.
    Steady {
        /// Concurrent sessions.
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
        #[command(flatten)]
        schedule: Schedule,
        #[command(flatten)]
        common: Common,
    },
    /// Drop → first resumed number, for `victims` sessions whose
    /// connections are cut `drops` times while `sessions` others stream.
    Resume {
        /// Sessions streaming undisturbed alongside.
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
        /// Sessions whose connections are cut.
        #[arg(long, default_value_t = 100)]
        victims: usize,
        /// Cuts per victim session.
        #[arg(long, default_value_t = 3)]
        drops: u32,
        #[command(flatten)]
        schedule: Schedule,
        #[command(flatten)]
        common: Common,
    },
    /// `steady` with the servers confined to fewer CPUs than they need
    /// (`--server-cpus`, 0 by default here), once per store: the bare
    /// baseline, numstream with the in-memory store (one port per server),
    /// numstream with Redis (one port shared with --reuse-port, one
    /// redis-server started here). Reports sessions verified, refused at
    /// admission and failed after WELCOME separately, and what the
    /// servers' logs and /metrics and Redis say about where time went.
    Overload {
        /// Concurrent sessions.
        #[arg(long, default_value_t = 20_000)]
        sessions: usize,
        /// Stores to run numstream with, in this order (repeatable, or
        /// comma-separated).
        #[arg(long = "store", value_enum, value_delimiter = ',', default_values = ["memory", "redis"])]
        stores: Vec<overload::Store>,
        /// Confine the load generator (this process and its workers) to
        /// these CPUs [default: not confined]
        #[arg(long, value_name = "LIST")]
        loadgen_cpus: Option<CpuList>,
        /// Confine the redis-server started here to these CPUs [default:
        /// not confined]
        #[arg(long, value_name = "LIST")]
        redis_cpus: Option<CpuList>,
        /// Run the servers as `steady` does: no status endpoint (the
        /// latency histograms cost the saturated servers CPU) and their
        /// logs discarded (text format); and no readings of the bytes left
        /// unread in the servers' Redis sockets (`ss` walks every socket on
        /// the machine: about 8% of a core at 80,000 sessions, taken from
        /// the load generator beside it). The report then has no server
        /// metrics, log counts or unread bytes.
        #[arg(long)]
        lean: bool,
        #[command(flatten)]
        schedule: Schedule,
        #[command(flatten)]
        common: Common,
    },
    /// Interval 0: time of one session of `count` numbers (repeated), and
    /// aggregate numbers/s of `parallel` sessions at once.
    Burst {
        #[arg(long, default_value_t = 65_535)]
        count: u16,
        /// Single-session runs (the median is reported).
        #[arg(long, default_value_t = 20)]
        repeats: usize,
        /// Sessions at once in the parallel phase.
        #[arg(long, default_value_t = 100)]
        parallel: usize,
        /// Parallel-phase runs (the best and the median are reported).
        #[arg(long, default_value_t = 3)]
        parallel_repeats: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Short sessions back to back from `concurrency` loops: sessions/s.
    Churn {
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Numbers per session.
        #[arg(long, default_value_t = 1)]
        count: u16,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[command(flatten)]
        common: Common,
    },
    /// Lateness p99 and server CPU against sessions, numstream and bare,
    /// from the JSON reports of several `steady` runs, as an SVG.
    Plot {
        /// Where to write the SVG.
        #[arg(long, default_value = "benchmarks/steady.svg")]
        out: PathBuf,
        /// JSON reports of `steady` runs.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
    },
    /// The bare baseline server (started by the scenarios).
    #[command(hide = true)]
    BareServer {
        /// 0: a port of the kernel's choice (see --ready-file).
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        bind: IpAddr,
        /// Share the port with other bare servers (SO_REUSEPORT).
        #[arg(long)]
        reuse_port: bool,
        /// Once listening, write `address=ADDR:PORT` to this file, as
        /// numstream-server does: how the scenarios learn the port.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Runs one share of a load and prints its result as JSON (started by
    /// the scenarios past the per-process descriptor limit).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        spec: String,
    },
}

#[derive(Debug, Clone, Copy, clap::Args)]
struct Schedule {
    /// Gap between numbers (the server's --interval).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Numbers per session: the run lasts about count × interval.
    #[arg(long, default_value_t = 40)]
    count: u16,
    /// Sessions start evenly over this long (unaligned ticks).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    ramp_up: Duration,
}

#[derive(Debug, Clone, clap::Args)]
struct Common {
    #[command(flatten)]
    server: ServerOptions,
    /// Measure only one flavor (default: bare, then numstream, then
    /// numstream-tls with `--tls`).
    #[arg(long, value_enum)]
    only: Option<Flavor>,
    /// Also measure numstream over TLS, against a CA and server
    /// certificate made for the run (never stored), in a third column next
    /// to plaintext numstream, with the ratio TLS / plaintext.
    #[arg(long)]
    tls: bool,
    /// Spread client connections over this many source addresses
    /// 127.0.1.1, 127.0.1.2, ... (0: the kernel's choice, whose ephemeral
    /// port search gets slow past ~14,000 connections to one server port).
    #[arg(long, default_value_t = 16)]
    source_ips: usize,
    /// Sessions per load-generator process; more sessions spawn more
    /// processes of this binary (the descriptor limit is per process).
    #[arg(long, default_value_t = 19_000)]
    per_process: usize,
    /// Where to write the JSON report.
    #[arg(long)]
    json: Option<PathBuf>,
}

impl Common {
    fn flavors(&self) -> Vec<Flavor> {
        match self.only {
            Some(flavor) => vec![flavor],
            None if self.tls => vec![Flavor::Bare, Flavor::Numstream, Flavor::NumstreamTls],
            None => vec![Flavor::Bare, Flavor::Numstream],
        }
    }

    /// Makes the run's CA and server certificate when a TLS flavor is
    /// measured; they are deleted when the returned value drops, so keep
    /// it until the run ends.
    fn prepare_tls(&mut self) -> anyhow::Result<Option<numstream_harness::tls::TestPki>> {
        if !self.flavors().contains(&Flavor::NumstreamTls) {
            return Ok(None);
        }
        if self.server.placement == servers::Placement::Spawn && !self.server.external.is_empty() {
            bail!("--tls starts its own servers: it cannot measure --connect ones");
        }
        let pki = numstream_harness::tls::TestPki::generate();
        self.server.tls = Some(servers::TlsMaterial {
            ca: pki.ca.clone(),
            cert: pki.server.cert.clone(),
            key: pki.server.key.clone(),
        });
        Ok(Some(pki))
    }

    /// The CA a load's clients trust, for the TLS flavor.
    fn tls_ca(&self, flavor: Flavor) -> Option<PathBuf> {
        match flavor {
            Flavor::NumstreamTls => self.server.tls.as_ref().map(|tls| tls.ca.clone()),
            Flavor::Bare | Flavor::Numstream => None,
        }
    }

    /// Whether the numstream servers are told to use a Redis store (the
    /// targets differ).
    fn redis(&self) -> bool {
        self.server
            .server_args
            .iter()
            .any(|arg| arg.starts_with("redis://") || arg.starts_with("redis-cluster://"))
    }

    fn sources(&self) -> Vec<IpAddr> {
        (0..self.source_ips)
            .map(|i| {
                let i = i + 1;
                IpAddr::V4(Ipv4Addr::new(127, 0, 1 + (i / 250) as u8, (i % 250) as u8))
            })
            .collect()
    }

    /// Where the report goes: `--json`, or a name of its own.
    fn report_path(&self, report: &Report) -> PathBuf {
        self.json.clone().unwrap_or_else(|| {
            PathBuf::from(format!(
                "target/bench-reports/{}-{}.json",
                report.scenario, report.unix_time
            ))
        })
    }

    fn finish(&self, report: Report) -> anyhow::Result<()> {
        self.finish_with(report, |_| {})
    }

    /// Judges, prints (the table, then `more`), writes the JSON, and fails
    /// if any session failed verification.
    fn finish_with(&self, mut report: Report, more: impl FnOnce(&Report)) -> anyhow::Result<()> {
        report.after = Some(Conditions::now());
        let verification: Vec<Target> = report
            .flavors
            .iter()
            .filter(|f| f.flavor.is_numstream())
            .map(|f| {
                let name = match f.label.as_str() {
                    "numstream" => "sessions failing verification".to_owned(),
                    label => format!("sessions failing verification ({label})"),
                };
                Target::at_most(&name, "", f.sessions_failed as f64, 0.0)
            })
            .collect();
        report.targets.splice(0..0, verification);
        report.warnings = report
            .flavors
            .iter()
            .filter_map(FlavorReport::loadgen_warning)
            .collect();
        report.print_table();
        more(&report);
        report.write_json(&self.report_path(&report))?;
        if report.flavors.iter().any(|f| f.sessions_failed > 0) {
            bail!("some sessions failed verification");
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Steady {
                sessions,
                schedule,
                mut common,
            } => {
                let _pki = common.prepare_tls()?;
                steady("steady", sessions, 0, 0, &schedule, &common).await
            }
            Command::Resume {
                sessions,
                victims,
                drops,
                schedule,
                mut common,
            } => {
                let _pki = common.prepare_tls()?;
                steady("resume", sessions, victims, drops, &schedule, &common).await
            }
            Command::Overload {
                sessions,
                stores,
                loadgen_cpus,
                redis_cpus,
                lean,
                schedule,
                common,
            } => {
                let cpus = overload::Cpus::choose(&common.server, loadgen_cpus, redis_cpus)?;
                overload::run(sessions, &stores, &cpus, lean, &schedule, &common).await
            }
            Command::Burst {
                count,
                repeats,
                parallel,
                parallel_repeats,
                mut common,
            } => {
                let _pki = common.prepare_tls()?;
                burst(count, repeats, parallel, parallel_repeats, &common).await
            }
            Command::Churn {
                concurrency,
                count,
                duration,
                mut common,
            } => {
                let _pki = common.prepare_tls()?;
                churn(concurrency, count, duration, &common).await
            }
            Command::Plot { out, reports } => plot::run(&reports, &out),
            Command::BareServer {
                port,
                bind,
                reuse_port,
                ready_file,
            } => {
                // The same listen backlog and options as numstream-server,
                // so the baseline differs only in what it serves.
                let options = numstream_server::ListenOptions {
                    reuse_port,
                    ..Default::default()
                };
                let listener = numstream_server::listen(SocketAddr::new(bind, port), options)
                    .with_context(|| format!("cannot listen on {bind}:{port}"))?;
                if let Some(path) = ready_file {
                    let ready = format!("address={}\n", listener.local_addr()?);
                    numstream_cli_support::write_ready_file(&path, &ready)
                        .with_context(|| format!("cannot write --ready-file {}", path.display()))?;
                }
                bare::serve(listener).await;
                Ok(())
            }
            Command::Worker { spec } => {
                let load: Load = serde_json::from_str(&spec).context("parsing --spec")?;
                let result = load::run(load).await;
                println!("{}", serde_json::to_string(&result)?);
                Ok(())
            }
        }
    })
}

/// A load running in this process or spread over worker processes.
enum Running {
    Here(tokio::task::JoinHandle<LoadResult>),
    Workers(Vec<std::process::Child>),
}

impl Running {
    /// Starts `loads`, worker processes under `taskset -c cpus` if given
    /// (a load run here is confined with this process, by the caller).
    fn start(loads: Vec<Load>, cpus: Option<&CpuList>) -> anyhow::Result<Self> {
        if let [load] = loads.as_slice() {
            return Ok(Running::Here(tokio::spawn(load::run(load.clone()))));
        }
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        for load in loads {
            let child = cpus::command(&exe, cpus)
                .args(["worker", "--spec", &serde_json::to_string(&load)?])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context("starting a worker process")?;
            children.push(child);
        }
        Ok(Running::Workers(children))
    }

    /// Load-generator processes, for their CPU.
    fn pids(&self) -> Vec<u32> {
        match self {
            Running::Here(_) => vec![std::process::id()],
            Running::Workers(children) => children.iter().map(|c| c.id()).collect(),
        }
    }

    async fn finish(self) -> anyhow::Result<LoadResult> {
        match self {
            Running::Here(task) => Ok(task.await?),
            Running::Workers(children) => {
                let mut merged = LoadResult::default();
                for child in children {
                    let output =
                        tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
                    if !output.status.success() {
                        bail!("a worker process failed ({})", output.status);
                    }
                    let result: LoadResult = serde_json::from_slice(&output.stdout)
                        .context("parsing a worker's result")?;
                    merged.merge(&result);
                }
                Ok(merged)
            }
        }
    }
}

fn samples(pids: &[u32]) -> Vec<ProcSample> {
    pids.iter()
        .filter_map(|&pid| ProcSample::read(pid))
        .collect()
}

/// The sessions of a `steady`-shaped load.
#[derive(Debug, Clone)]
struct SteadyLoad {
    sessions: usize,
    /// Sessions whose connections are cut `drops` times each.
    victims: usize,
    drops: u32,
    schedule: Schedule,
}

impl SteadyLoad {
    /// Last number's due time after a session's start; fails when no
    /// window is left in which every session is connected and none has
    /// finished (where CPU and memory are read).
    fn last_tick(&self) -> anyhow::Result<Duration> {
        let Schedule {
            interval,
            count,
            ramp_up,
        } = self.schedule;
        // The first session ends `count - 1` intervals after the first
        // start; the last one is connected by the end of the ramp-up.
        let last_tick = interval * u32::from(count.saturating_sub(1));
        if last_tick <= ramp_up + SETTLE + Duration::from_secs(3) {
            bail!(
                "count × interval ({}) leaves no window with every session connected: it must exceed the ramp-up ({}) by at least 5 s",
                humantime::format_duration(last_tick),
                humantime::format_duration(ramp_up)
            );
        }
        Ok(last_tick)
    }

    fn params(&self, servers: usize) -> serde_json::Value {
        let Schedule {
            interval,
            count,
            ramp_up,
        } = self.schedule;
        serde_json::json!({
            "sessions": self.sessions, "victims": self.victims, "drops": self.drops,
            "interval_ms": interval.as_secs_f64() * 1000.0, "count": count,
            "ramp_up_s": ramp_up.as_secs_f64(), "servers": servers,
        })
    }
}

/// Time after the ramp-up before the measurement window opens.
const SETTLE: Duration = Duration::from_secs(2);

/// What one steady load against one set of servers measured.
struct Measured {
    result: LoadResult,
    usage: ServerUsage,
    /// The servers' /metrics at the end (`--server-metrics`), summed.
    metrics: Option<MetricsSum>,
    /// CPU second by second, from the load's start to its end.
    timeline: Vec<timeline::Tick>,
}

/// Starts the servers of `flavor`, runs `load` against them (over worker
/// processes past `--per-process`, confined to `loadgen_cpus` if given),
/// reads CPU and RSS over the window in which every session is connected
/// and none has finished (and the CPU of `store_pid`, a redis-server, over
/// the same window), reads their /metrics once every session has ended,
/// and stops them.
async fn measure_steady(
    flavor: Flavor,
    server: &ServerOptions,
    load: &SteadyLoad,
    common: &Common,
    loadgen_cpus: Option<&CpuList>,
    store_pid: Option<u32>,
) -> anyhow::Result<Measured> {
    let last_tick = load.last_tick()?;
    let Schedule {
        interval,
        count,
        ramp_up,
    } = load.schedule;
    let (sessions, victims) = (load.sessions, load.victims);
    let servers = Servers::start(flavor, server, interval).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = servers.sample();
    let processes = sessions.div_ceil(common.per_process.max(1)).max(1);
    let lead = if processes > 1 { 2000 } else { 300 };
    let start_unix_ms = load::unix_ms_now() + lead;
    let start = load::instant_of_unix_ms(start_unix_ms);
    let per_process = sessions.div_ceil(processes);
    let loads = (0..processes)
        .map(|p| Load {
            flavor,
            addrs: servers.addrs.clone(),
            sources: common.sources(),
            tls_ca: common.tls_ca(flavor),
            client_tls: None,
            kind: LoadKind::Steady {
                total: sessions,
                first: p * per_process,
                sessions: per_process.min(sessions.saturating_sub(p * per_process)),
                count,
                interval_us: interval.as_micros() as u64,
                ramp_up_ms: ramp_up.as_millis() as u64,
                start_unix_ms,
                victims: if p == 0 { victims } else { 0 },
                drops: load.drops,
            },
        })
        .collect();
    let running = Running::start(loads, loadgen_cpus)?;
    let loadgen = running.pids();
    let store: Vec<u32> = store_pid.into_iter().collect();
    let timeline = timeline::Timeline::start(timeline::Parties {
        servers: servers.pids.clone(),
        loadgen: loadgen.clone(),
        redis: store.clone(),
    });
    sleep_until(start + ramp_up + SETTLE).await;
    let (from, loadgen_from, store_from) = (servers.sample(), samples(&loadgen), samples(&store));
    sleep_until(start + last_tick - Duration::from_secs(1)).await;
    let (to, loadgen_to, store_to) = (servers.sample(), samples(&loadgen), samples(&store));
    let result = running.finish().await;
    let timeline = timeline.finish().await;
    let result = result?;
    let metrics = if servers.metrics.is_empty() {
        None
    } else {
        Some(MetricsSum::read(&servers.metrics).await)
    };
    servers.stop().await;
    let mut usage = ServerUsage::between(
        &idle,
        &from,
        &to,
        (&loadgen_from, &loadgen_to),
        sessions + victims,
    );
    // Every session (victims too) is due one number per interval in the
    // window.
    let due_per_s = (sessions + victims) as f64 / interval.as_secs_f64().max(1e-9);
    usage.cpu_us_per_number = usage.cpu_percent / 100.0 * 1e6 / due_per_s;
    usage.redis_cpu_percent = store_from
        .iter()
        .zip(&store_to)
        .map(|(a, b)| a.cpu_percent_until(b))
        .sum::<f64>()
        + 0.0;
    Ok(Measured {
        result,
        usage,
        metrics,
        timeline,
    })
}

/// `steady` and `resume`: the window in which every session is connected
/// and none has finished is where CPU and memory are read.
async fn steady(
    scenario: &str,
    sessions: usize,
    victims: usize,
    drops: u32,
    schedule: &Schedule,
    common: &Common,
) -> anyhow::Result<()> {
    let load = SteadyLoad {
        sessions,
        victims,
        drops,
        schedule: *schedule,
    };
    load.last_tick()?;
    let mut report = Report::new(scenario);
    report
        .extra
        .insert("params".into(), load.params(common.server.servers));
    for flavor in common.flavors() {
        let measured = measure_steady(flavor, &common.server, &load, common, None, None).await?;
        if let Some(metrics) = &measured.metrics {
            report.diagnosis.insert(
                format!("{} server metrics", flavor.name()),
                serde_json::json!({"counters": metrics.counters(),
                    "histograms": metrics.histograms(), "unreadable": metrics.unreadable}),
            );
        }
        report
            .flavors
            .push(FlavorReport::new(flavor, &measured.result, measured.usage));
    }
    let lateness_limit = if common.server.servers > 1 {
        50.0
    } else {
        20.0
    };
    if let Some(numstream) = report.flavor(Flavor::Numstream).cloned() {
        if victims > 0 {
            let (store, limit) = if common.redis() {
                ("Redis", 200.0)
            } else {
                ("memory", 150.0)
            };
            report.targets.push(Target::at_most(
                &format!("resume p99 ({store} store)"),
                "ms",
                numstream.resume.p99_ms,
                limit,
            ));
        } else {
            report.targets.push(Target::at_most(
                "lateness p99",
                "ms",
                numstream.lateness.p99_ms,
                lateness_limit,
            ));
            report.targets.push(Target::at_most(
                "server RSS per session",
                "B",
                numstream.server.rss_per_session_bytes,
                2048.0,
            ));
        }
    }
    if let Some(ratio) = report.ratio(|f| f.server.cpu_percent) {
        report.targets.push(Target::at_most(
            "server CPU numstream/bare",
            "x",
            ratio,
            1.3,
        ));
    }
    if let Some(ratio) = report.tls_ratio(|f| f.server.cpu_percent) {
        report.targets.push(Target::at_most(
            "server CPU numstream TLS/plaintext",
            "x",
            ratio,
            1.5,
        ));
    }
    common.finish(report)
}

async fn burst(
    count: u16,
    repeats: usize,
    parallel: usize,
    parallel_repeats: usize,
    common: &Common,
) -> anyhow::Result<()> {
    let mut report = Report::new("burst");
    report.extra.insert(
        "params".into(),
        serde_json::json!({"count": count, "repeats": repeats, "parallel": parallel,
            "parallel_repeats": parallel_repeats}),
    );
    let mut single_medians = Vec::new();
    for flavor in common.flavors() {
        let servers = Servers::start(flavor, &common.server, Duration::ZERO).await?;
        let load = |parallel| Load {
            flavor,
            addrs: servers.addrs.clone(),
            sources: common.sources(),
            tls_ca: common.tls_ca(flavor),
            client_tls: None,
            kind: LoadKind::Burst { parallel, count },
        };
        let mut singles = Vec::new();
        let mut failed = LoadResult::default();
        for _ in 0..repeats {
            let result = load::run(load(1)).await;
            singles.push(result.wall_s * 1000.0);
            if result.failed > 0 {
                failed.merge(&result);
            }
        }
        singles.sort_by(f64::total_cmp);
        let median = singles.get(singles.len() / 2).copied().unwrap_or(0.0);
        single_medians.push((flavor, median));
        report.extra.insert(
            format!("{} single session ms (min/median/max)", flavor.name()),
            serde_json::json!([singles.first(), median, singles.last()]),
        );

        let mut best: Option<(LoadResult, ServerUsage)> = None;
        let mut rates = Vec::new();
        for _ in 0..parallel_repeats.max(1) {
            let loadgen = [std::process::id()];
            let (from, loadgen_from) = (servers.sample(), samples(&loadgen));
            let result = load::run(load(parallel)).await;
            let (to, loadgen_to) = (servers.sample(), samples(&loadgen));
            let usage = ServerUsage::between(&from, &from, &to, (&loadgen_from, &loadgen_to), 0);
            let rate = result.numbers as f64 / result.wall_s.max(1e-9);
            rates.push(rate);
            if result.failed > 0 {
                failed.merge(&result);
            }
            if best.as_ref().is_none_or(|(b, _)| result.wall_s < b.wall_s) {
                best = Some((result, usage));
            }
        }
        servers.stop().await;
        let (mut result, usage) = best.unwrap_or_default();
        result.failed += failed.failed;
        result.errors.extend(failed.errors);
        rates.sort_by(f64::total_cmp);
        report.extra.insert(
            format!("{} parallel numbers/s (runs)", flavor.name()),
            serde_json::json!(rates),
        );
        report
            .flavors
            .push(FlavorReport::new(flavor, &result, usage));
    }
    if let [(Flavor::Bare, bare), (Flavor::Numstream, numstream)] = single_medians.as_slice() {
        report.targets.push(Target::at_most(
            "single burst time numstream/bare",
            "x",
            numstream / bare,
            2.0,
        ));
    }
    if let Some(numstream) = report.flavor(Flavor::Numstream).cloned() {
        report.targets.push(Target::at_least(
            "parallel burst numbers/s",
            "/s",
            numstream.numbers_per_s,
            50e6,
        ));
    }
    common.finish(report)
}

async fn churn(
    concurrency: usize,
    count: u16,
    duration: Duration,
    common: &Common,
) -> anyhow::Result<()> {
    let mut report = Report::new("churn");
    report.extra.insert(
        "params".into(),
        serde_json::json!({"concurrency": concurrency, "count": count,
            "duration_s": duration.as_secs_f64()}),
    );
    for flavor in common.flavors() {
        let servers = Servers::start(flavor, &common.server, Duration::ZERO).await?;
        let loadgen = [std::process::id()];
        let idle = servers.sample();
        let loadgen_from = samples(&loadgen);
        let result = load::run(Load {
            flavor,
            addrs: servers.addrs.clone(),
            sources: common.sources(),
            tls_ca: common.tls_ca(flavor),
            client_tls: None,
            kind: LoadKind::Churn {
                concurrency,
                count,
                duration_ms: duration.as_millis() as u64,
            },
        })
        .await;
        let (to, loadgen_to) = (servers.sample(), samples(&loadgen));
        servers.stop().await;
        let mut usage = ServerUsage::between(&idle, &idle, &to, (&loadgen_from, &loadgen_to), 0);
        if result.ok > 0 {
            usage.cpu_us_per_session =
                usage.cpu_percent / 100.0 * usage.window_s * 1e6 / result.ok as f64;
        }
        report
            .flavors
            .push(FlavorReport::new(flavor, &result, usage));
    }
    if let Some(numstream) = report.flavor(Flavor::Numstream).cloned() {
        let (store, floor) = if common.redis() {
            ("Redis", 10_000.0)
        } else {
            ("memory", 20_000.0)
        };
        report.targets.push(Target::at_least(
            &format!("churn sessions/s ({store} store)"),
            "/s",
            numstream.sessions_per_s,
            floor,
        ));
    }
    common.finish(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common_of(args: &[&str]) -> Common {
        let cli = Cli::try_parse_from(args).expect("the arguments parse");
        match cli.command {
            Command::Steady { common, .. }
            | Command::Resume { common, .. }
            | Command::Churn { common, .. } => common,
            other => panic!("unexpected command {other:?}"),
        }
    }

    #[test]
    fn tls_adds_numstream_over_tls_after_plaintext() {
        for scenario in ["steady", "resume", "churn"] {
            let common = common_of(&["numstream-bench", scenario, "--tls"]);
            assert_eq!(
                common.flavors(),
                [Flavor::Bare, Flavor::Numstream, Flavor::NumstreamTls],
                "{scenario} --tls"
            );
            let plain = common_of(&["numstream-bench", scenario]);
            assert_eq!(plain.flavors(), [Flavor::Bare, Flavor::Numstream]);
        }
    }

    #[test]
    fn tls_makes_a_certificate_only_the_tls_clients_trust() {
        let mut common = common_of(&["numstream-bench", "steady", "--only", "numstream-tls"]);
        assert_eq!(common.flavors(), [Flavor::NumstreamTls]);
        let pki = common.prepare_tls().expect("the certificate is made");
        let material = common.server.tls.clone().expect("the servers get it");
        assert!(material.cert.exists() && material.key.exists() && material.ca.exists());
        assert_eq!(
            common.tls_ca(Flavor::NumstreamTls),
            Some(material.ca.clone())
        );
        assert_eq!(common.tls_ca(Flavor::Numstream), None);
        drop(pki);
        assert!(!material.key.exists(), "the key outlived the run");

        let mut plain = common_of(&["numstream-bench", "churn"]);
        assert!(plain.prepare_tls().expect("nothing to make").is_none());
        assert!(plain.server.tls.is_none());
    }

    #[test]
    fn tls_refuses_servers_it_did_not_start() {
        let mut common = common_of(&[
            "numstream-bench",
            "steady",
            "--tls",
            "--connect",
            "127.0.0.1:7000",
        ]);
        let error = common
            .prepare_tls()
            .expect_err("--connect has no certificate of ours");
        assert!(error.to_string().contains("--connect"), "{error}");
    }
}
