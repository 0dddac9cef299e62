//! `overload`: the steady load of `steady` against servers confined to
//! fewer CPUs than they need (issue 15), once per store, with the load
//! generator and Redis on the other CPUs. Besides verified and failed, it
//! reports the sessions refused at admission (`server_busy` before any
//! WELCOME) and those that failed after their WELCOME, repaired by a
//! resume or not (`load::Outcomes`), and gathers what explains them: the
//! servers' log lines counted, their `/metrics` (store operation latency
//! as the servers waited for it, send lateness), and Redis's own account
//! (time per script, slow log, a PING probe from an unloaded thread, the
//! replies that sat unread in the servers' sockets).

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::cpus::{self, CpuList};
use crate::redis_watch::Redis;
use crate::report::{FlavorReport, Report, Target};
use crate::servers::{Flavor, ServerOptions};
use crate::timeline;
use crate::{Common, Schedule, SteadyLoad, measure_steady, server_log};

/// Where a numstream run keeps its sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Store {
    /// In-memory store; one port per server (a resume must reach the
    /// process that holds the session).
    Memory,
    /// One redis-server started for the run; every server on one port
    /// (`--reuse-port`), the intended deployment.
    Redis,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Memory => "memory",
            Store::Redis => "redis",
        }
    }
}

/// Which CPUs each party runs on; `None`: wherever the kernel puts it.
#[derive(Debug, Clone)]
pub(crate) struct Cpus {
    servers: CpuList,
    loadgen: Option<CpuList>,
    redis: Option<CpuList>,
}

impl Cpus {
    /// The servers on `--server-cpus` (CPU 0 if not given); the load
    /// generator and Redis confined only when asked (the issue's
    /// measurement left them to the kernel, which keeps them mostly off a
    /// saturated CPU); every list checked against the CPUs this process
    /// may use.
    pub(crate) fn choose(
        server: &ServerOptions,
        loadgen: Option<CpuList>,
        redis: Option<CpuList>,
    ) -> anyhow::Result<Self> {
        cpus::require_taskset()?;
        let allowed = CpuList::allowed()?;
        let servers = match &server.server_cpus {
            Some(list) => list.clone(),
            None => "0".parse().map_err(anyhow::Error::msg)?,
        };
        servers.check_within(&allowed, "--server-cpus")?;
        for (list, flag) in [(&loadgen, "--loadgen-cpus"), (&redis, "--redis-cpus")] {
            if let Some(list) = list {
                list.check_within(&allowed, flag)?;
            }
        }
        Ok(Self {
            servers,
            loadgen,
            redis,
        })
    }
}

/// A CPU list for the report, "any" when not confined.
fn shown(cpus: Option<&CpuList>) -> String {
    cpus.map_or_else(|| "any".to_owned(), CpuList::to_string)
}

pub(crate) async fn run(
    sessions: usize,
    stores: &[Store],
    cpus: &Cpus,
    lean: bool,
    schedule: &Schedule,
    common: &Common,
) -> anyhow::Result<()> {
    for (flag, what) in [("--store", "the store"), ("--reuse-port", "--reuse-port")] {
        if common.server.sets(flag) {
            bail!(
                "overload chooses {what} itself (--store memory|redis); do not pass {flag} as a --server-arg"
            );
        }
    }
    if stores.is_empty() {
        bail!("--store names no store");
    }
    if common.tls || common.only == Some(Flavor::NumstreamTls) {
        bail!(
            "overload measures plaintext numstream only; --tls is for steady, resume, churn and burst"
        );
    }
    let load = SteadyLoad {
        sessions,
        victims: 0,
        drops: 0,
        schedule: *schedule,
    };
    load.last_tick()?;
    let mut report = Report::new("overload");
    let mut params = load.params(common.server.servers);
    params["server_cpus"] = cpus.servers.to_string().into();
    params["loadgen_cpus"] = shown(cpus.loadgen.as_ref()).into();
    params["redis_cpus"] = shown(cpus.redis.as_ref()).into();
    params["lean"] = lean.into();
    report.extra.insert("params".into(), params);
    let report_path = common.report_path(&report);
    // This process runs the load (or its workers' clock) and the Redis
    // probe; its workers are confined as they start.
    if let Some(loadgen) = &cpus.loadgen {
        cpus::pin(std::process::id(), loadgen)?;
    }
    println!(
        "overload: servers on CPU {}, load generator on {}, Redis on {}",
        cpus.servers,
        shown(cpus.loadgen.as_ref()),
        shown(cpus.redis.as_ref())
    );

    let mut runs: Vec<Option<Store>> = Vec::new();
    if common.only != Some(Flavor::Numstream) {
        runs.push(None);
    }
    if common.only != Some(Flavor::Bare) {
        runs.extend(stores.iter().copied().map(Some));
    }
    for store in runs {
        let flavor = if store.is_some() {
            Flavor::Numstream
        } else {
            Flavor::Bare
        };
        let label = store.map_or("bare", Store::name);
        let mut server = common.server.clone();
        server.server_cpus = Some(cpus.servers.clone());
        let log = log_path(&report_path, label);
        let redis = match store {
            Some(Store::Redis) => Some(Redis::start(cpus.redis.as_ref()).await?),
            _ => None,
        };
        if store.is_some() && !lean {
            server.server_metrics = true;
            server.server_log = Some(log.clone());
            if let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            // A fresh log per run: the counts below are this run's.
            if log.exists() {
                std::fs::remove_file(&log)?;
            }
            if !server.sets("--log-format") {
                server
                    .server_args
                    .extend(["--log-format".into(), "json".into()]);
            }
        }
        if let Some(store) = store {
            server.reuse_port = store == Store::Redis;
        }
        if let Some(redis) = &redis {
            server.server_args.extend(["--store".into(), redis.url()]);
        }
        println!(
            "overload: {label} ({sessions} sessions, {} servers)",
            server.servers
        );
        let watch = redis.as_ref().map(|redis| redis.watch(!lean));
        let measured = measure_steady(
            flavor,
            &server,
            &load,
            common,
            cpus.loadgen.as_ref(),
            redis.as_ref().map(Redis::pid),
        )
        .await;
        let watched = watch.map(|watch| watch.finish());
        let account = match &redis {
            Some(redis) => Some(redis.account().await),
            None => None,
        };
        drop(redis);
        let measured = measured?;

        let mut diagnosis = serde_json::Map::new();
        diagnosis.insert("timeline".into(), serde_json::json!(measured.timeline));
        let outcomes = &measured.result.outcomes;
        diagnosis.insert(
            "interruption causes".into(),
            serde_json::json!(outcomes.interruption_causes),
        );
        diagnosis.insert(
            "admission causes".into(),
            serde_json::json!(outcomes.admission_causes),
        );
        if let Some(metrics) = &measured.metrics {
            diagnosis.insert(
                "server counters".into(),
                serde_json::json!(metrics.counters()),
            );
            diagnosis.insert(
                "server histograms".into(),
                serde_json::json!(metrics.histograms()),
            );
            if !metrics.unreadable.is_empty() {
                diagnosis.insert(
                    "unreadable /metrics".into(),
                    serde_json::json!(metrics.unreadable),
                );
            }
        }
        // `--server-log` given with `--lean` names the log itself.
        if let Some(log) = &server.server_log {
            let counts = server_log::count(log)?;
            diagnosis.insert("server log".into(), serde_json::json!(counts));
            diagnosis.insert("server log file".into(), log.display().to_string().into());
        }
        if let Some(watched) = watched {
            diagnosis.insert("redis probe".into(), serde_json::json!(watched));
        }
        match account {
            Some(Ok(account)) => {
                diagnosis.insert("redis account".into(), serde_json::json!(account));
            }
            Some(Err(error)) => {
                diagnosis.insert("redis account".into(), format!("{error:#}").into());
            }
            None => {}
        }
        report
            .diagnosis
            .insert(label.to_owned(), serde_json::Value::Object(diagnosis));
        let mut column = FlavorReport::new(flavor, &measured.result, measured.usage);
        column.label = label.to_owned();
        report.flavors.push(column);
    }

    for column in report.flavors.clone() {
        if column.flavor != Flavor::Numstream {
            continue;
        }
        let verified = 100.0 * column.sessions_ok as f64 / sessions.max(1) as f64;
        report.targets.push(Target::at_least(
            &format!("verified ({})", column.label),
            "%",
            verified,
            95.0,
        ));
        report.targets.push(Target::at_most(
            &format!("failed after WELCOME ({})", column.label),
            "",
            column.outcomes.failed_after_welcome() as f64,
            0.0,
        ));
    }
    let missed: Vec<String> = report
        .targets
        .iter()
        .filter(|t| !t.met)
        .map(|t| t.name.clone())
        .collect();
    common.finish_with(report, print_diagnosis)?;
    if !missed.is_empty() {
        bail!("missed: {}", missed.join(", "));
    }
    Ok(())
}

/// `<report>-<label>-servers.log`, next to the JSON report.
fn log_path(report: &Path, label: &str) -> PathBuf {
    let stem = report
        .file_stem()
        .map_or_else(|| "overload".into(), |s| s.to_string_lossy().into_owned());
    report.with_file_name(format!("{stem}-{label}-servers.log"))
}

/// The few lines of the diagnosis worth reading at the terminal; the JSON
/// report has all of it.
fn print_diagnosis(report: &Report) {
    for (label, diagnosis) in &report.diagnosis {
        println!("--- {label}");
        let get = |key: &str| diagnosis.get(key).filter(|v| !v.is_null());
        if let Some(ticks) = get("timeline")
            .and_then(|v| serde_json::from_value::<Vec<timeline::Tick>>(v.clone()).ok())
        {
            println!("CPU, 5-second means (% of one core; CPUs busy: whole machine):");
            for line in timeline::render(&ticks, 5) {
                println!("  {line}");
            }
        }
        for key in ["interruption causes", "admission causes"] {
            if let Some(causes) = get(key)
                .and_then(|v| v.as_object())
                .filter(|o| !o.is_empty())
            {
                println!("{key}: {}", serde_json::Value::Object(causes.clone()));
            }
        }
        if let Some(log) = get("server log") {
            println!("server log: {} lines", log["lines"]);
            for entry in log["top"].as_array().into_iter().flatten().take(12) {
                println!(
                    "  {:>8} {}",
                    entry[0],
                    entry[1].as_str().unwrap_or_default()
                );
            }
        }
        if let Some(histograms) = get("server histograms").and_then(|v| v.as_object()) {
            for (name, h) in histograms {
                let short = name
                    .trim_start_matches("numstream_")
                    .replace("store_operation_duration_seconds", "store op");
                println!(
                    "  {short}: n {} mean {:.1} ms p50 <= {} ms p99 <= {} ms over 100 ms+ {}",
                    h["count"],
                    h["mean_ms"].as_f64().unwrap_or(0.0),
                    h["p50_at_most_ms"],
                    h["p99_at_most_ms"],
                    h["above_ms"]
                );
            }
        }
        if let Some(probe) = get("redis probe") {
            print!(
                "redis PING from the load generator: p50 {} ms p99 {} ms max {} ms",
                probe["ping"]["p50_ms"], probe["ping"]["p99_ms"], probe["ping"]["max_ms"],
            );
            if probe["unread_readings"].as_u64().unwrap_or(0) > 0 {
                print!(
                    "; unread bytes in the servers' Redis sockets: max {} (mean {:.0}), {} of {} readings non-zero",
                    probe["unread_total_bytes_max"],
                    probe["unread_total_bytes_mean"].as_f64().unwrap_or(0.0),
                    probe["readings_with_unread"],
                    probe["unread_readings"]
                );
            }
            println!();
        }
        if let Some(account) = get("redis account") {
            for command in account["commands"].as_array().into_iter().flatten() {
                println!(
                    "redis {}: {} calls, {} µs per call, {} failed",
                    command["command"],
                    command["calls"],
                    command["usec_per_call"],
                    command["failed_calls"]
                );
            }
            println!(
                "redis slowlog (> 10 ms): {} entries; latency events: {}; {}",
                account["slowlog_entries"], account["latency_latest"], account["stats"]
            );
        }
    }
}
