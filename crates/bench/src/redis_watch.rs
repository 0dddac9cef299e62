//! The Redis of the overload scenario, and what it says about a run: a
//! redis-server the load generator starts (the harness's launcher, no
//! persistence, a free port) and optionally confines to some CPUs; while
//! the load runs, a PING every 20 ms from an unloaded thread of the load
//! generator (how long Redis takes to answer someone who reads at once),
//! and every half second the bytes Redis has sent the servers that they
//! have not read yet (`Recv-Q` of their sockets to Redis, from `ss`);
//! afterwards, Redis's own accounts: `INFO commandstats` (time spent per
//! command), `SLOWLOG` (commands over 10 ms) and `LATENCY LATEST` (events
//! over 10 ms). If the servers wait seconds for answers that Redis gave in
//! microseconds and that sat unread in their sockets, the delay is theirs.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::cpus::{self, CpuList};
use crate::stats::{Shards, Summary};

/// Gap between the probe's PINGs.
const PING_EVERY: Duration = Duration::from_millis(20);
/// Gap between two readings of the servers' unread bytes.
const UNREAD_EVERY: Duration = Duration::from_millis(500);
/// Redis's threshold for `SLOWLOG` and `LATENCY` entries, in ms.
const SLOW_MS: u64 = 10;
/// `INFO stats` fields kept: connections made (a client that reconnects
/// after timeouts shows here), commands run, bytes exchanged.
const STATS: &[&str] = &[
    "total_connections_received",
    "total_commands_processed",
    "total_net_input_bytes",
    "total_net_output_bytes",
    "rejected_connections",
];

/// A redis-server owned by the scenario; killed when dropped.
#[derive(Debug)]
pub(crate) struct Redis {
    server: numstream_harness::redis::RedisServer,
}

impl Redis {
    /// Starts redis-server (confined to `cpus` if given) and sets its slow
    /// thresholds.
    pub(crate) async fn start(cpus: Option<&CpuList>) -> anyhow::Result<Self> {
        // the harness's launcher panics without redis-server (right for a
        // test); a command line tool says so instead.
        let found = Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success());
        if !found {
            bail!("the Redis store needs redis-server on PATH (apt-get install -y redis-server)");
        }
        let server = tokio::task::spawn_blocking(numstream_harness::redis::RedisServer::start)
            .await
            .context("starting redis-server")?;
        if let Some(cpus) = cpus {
            cpus::pin(server.pid(), cpus)?;
        }
        // Redis shares its CPU with the load generator, which saturates it
        // in the overload runs. At equal priority the load generator's
        // threads preempted Redis for whole time slices: PING p99 300 ms,
        // max 470 ms, and the servers' store operations timed out on
        // Redis's scheduling, not on their own (issue 15 is about the
        // servers being starved; a production Redis has a machine of its
        // own). Measured at 80,000 sessions with admission control off:
        // PING p99 36 ms once raised, and no `store_unavailable` at all.
        if let Err(why) = cpus::prioritize(server.pid()) {
            eprintln!(
                "redis-server left at normal priority ({why}): its latency includes the load generator's time slices"
            );
        }
        let redis = Self { server };
        let slow_us = (SLOW_MS * 1000).to_string();
        let slow_ms = SLOW_MS.to_string();
        redis
            .command(&[
                &["CONFIG", "SET", "slowlog-log-slower-than", &slow_us],
                &["CONFIG", "SET", "latency-monitor-threshold", &slow_ms],
            ])
            .await?;
        Ok(redis)
    }

    /// The `--store` URL for the servers.
    pub(crate) fn url(&self) -> String {
        format!("{}0", self.server.url())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// Starts the PING probe and, if `unread`, the unread-bytes sampler.
    pub(crate) fn watch(&self, unread: bool) -> Watch {
        Watch::start(self.server.port(), unread)
    }

    /// Redis's own account of the run so far.
    pub(crate) async fn account(&self) -> anyhow::Result<RedisAccount> {
        let replies = self
            .command(&[
                &["INFO", "commandstats"],
                &["INFO", "cpu"],
                &["INFO", "stats"],
                &["SLOWLOG", "LEN"],
                &["SLOWLOG", "GET", "5"],
                &["LATENCY", "LATEST"],
            ])
            .await?;
        let [commandstats, cpu, stats, slowlog_len, slowlog, latency] = replies.as_slice() else {
            bail!("Redis gave {} replies to 6 commands", replies.len());
        };
        let lines = |info: &serde_json::Value, keep: &dyn Fn(&str) -> bool| -> Vec<String> {
            info.as_str()
                .map(|text| {
                    text.lines()
                        .filter(|line| keep(line))
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(RedisAccount {
            commands: commandstats
                .as_str()
                .map(parse_commandstats)
                .unwrap_or_default(),
            cpu: lines(cpu, &|line| line.starts_with("used_cpu_")),
            stats: lines(stats, &|line| {
                STATS.iter().any(|key| line.starts_with(&format!("{key}:")))
            }),
            slowlog_entries: slowlog_len.as_i64().unwrap_or(-1),
            slowlog_top: slowlog.clone(),
            latency_latest: latency.clone(),
        })
    }

    /// Runs `commands` on one connection, each reply as JSON.
    async fn command(&self, commands: &[&[&str]]) -> anyhow::Result<Vec<serde_json::Value>> {
        let url = self.server.url();
        let commands: Vec<Vec<String>> = commands
            .iter()
            .map(|words| words.iter().map(|w| (*w).to_owned()).collect())
            .collect();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<serde_json::Value>> {
            let client = redis::Client::open(url.as_str())?;
            let mut connection = client
                .get_connection_with_timeout(Duration::from_secs(5))
                .context("connecting to the scenario's redis-server")?;
            connection.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut replies = Vec::new();
            for words in commands {
                let mut command = redis::cmd(&words[0]);
                for word in &words[1..] {
                    command.arg(word);
                }
                let reply: redis::Value = command
                    .query(&mut connection)
                    .with_context(|| format!("redis {}", words.join(" ")))?;
                replies.push(to_json(&reply));
            }
            Ok(replies)
        })
        .await?
    }
}

/// What Redis says it did.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RedisAccount {
    /// Per command: calls, total µs, µs per call, failed and rejected
    /// calls.
    pub(crate) commands: Vec<CommandStat>,
    /// `used_cpu_*` lines of `INFO cpu` (seconds since start).
    pub(crate) cpu: Vec<String>,
    /// The [`STATS`] lines of `INFO stats`.
    pub(crate) stats: Vec<String>,
    /// Commands that ran longer than 10 ms.
    pub(crate) slowlog_entries: i64,
    pub(crate) slowlog_top: serde_json::Value,
    /// Latency events over 10 ms: `[event, time, latest ms, max ms]`.
    pub(crate) latency_latest: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct CommandStat {
    pub(crate) command: String,
    pub(crate) calls: u64,
    pub(crate) usec: u64,
    pub(crate) usec_per_call: f64,
    pub(crate) failed_calls: u64,
    pub(crate) rejected_calls: u64,
}

/// `cmdstat_evalsha:calls=3,usec=60,usec_per_call=20.00,...` lines.
fn parse_commandstats(info: &str) -> Vec<CommandStat> {
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| {
                fields
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            };
            let int = |key: &str| field(key).and_then(|v| v.parse().ok()).unwrap_or(0);
            Some(CommandStat {
                command: name.to_owned(),
                calls: int("calls"),
                usec: int("usec"),
                usec_per_call: field("usec_per_call")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0),
                failed_calls: int("failed_calls"),
                rejected_calls: int("rejected_calls"),
            })
        })
        .collect()
}

fn to_json(value: &redis::Value) -> serde_json::Value {
    use redis::Value as V;
    match value {
        V::Nil => serde_json::Value::Null,
        V::Int(n) => (*n).into(),
        V::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned().into(),
        V::SimpleString(text) => text.clone().into(),
        V::Okay => "OK".into(),
        V::Array(items) | V::Set(items) => items.iter().map(to_json).collect(),
        V::Double(x) => (*x).into(),
        V::Boolean(b) => (*b).into(),
        other => format!("{other:?}").into(),
    }
}

/// The probe and the sampler, on threads of their own so that a busy load
/// generator runtime does not delay them.
#[derive(Debug)]
pub(crate) struct Watch {
    stop: Arc<AtomicBool>,
    ping: JoinHandle<PingResult>,
    /// `None` when not sampled.
    unread: Option<JoinHandle<Vec<UnreadSample>>>,
}

struct PingResult {
    latency: Shards,
    failures: u64,
}

/// One reading of the servers' sockets to Redis.
#[derive(Debug, Clone, Copy)]
struct UnreadSample {
    sockets: u64,
    total_bytes: u64,
    max_bytes: u64,
}

/// What the watch saw while the load ran.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Watched {
    /// PING round trips from the load generator.
    pub(crate) ping: Summary,
    pub(crate) ping_failures: u64,
    /// Readings of the sockets connected to Redis (the servers' command
    /// and pub/sub connections and the probe's, whose replies are read at
    /// once): how many readings, and of the bytes that had arrived and
    /// not been read, the largest total and single socket seen, and the
    /// mean total.
    pub(crate) unread_readings: usize,
    pub(crate) unread_sockets_max: u64,
    pub(crate) unread_total_bytes_max: u64,
    pub(crate) unread_total_bytes_mean: f64,
    pub(crate) unread_socket_bytes_max: u64,
    /// Readings in which any socket to Redis held unread bytes.
    pub(crate) readings_with_unread: usize,
}

impl Watch {
    fn start(port: u16, sample_unread: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ping = {
            let stop = stop.clone();
            std::thread::spawn(move || ping_loop(port, &stop))
        };
        let unread = sample_unread.then(|| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Some(sample) = unread_bytes(port) {
                        samples.push(sample);
                    }
                    std::thread::sleep(UNREAD_EVERY);
                }
                samples
            })
        });
        Self { stop, ping, unread }
    }

    pub(crate) fn finish(self) -> Watched {
        self.stop.store(true, Ordering::Relaxed);
        let ping = self.ping.join().unwrap_or_else(|_| PingResult {
            latency: Shards::new(),
            failures: u64::MAX,
        });
        let samples = self
            .unread
            .map(|unread| unread.join().unwrap_or_default())
            .unwrap_or_default();
        let readings = samples.len();
        Watched {
            ping: ping.latency.data().summary(),
            ping_failures: ping.failures,
            unread_readings: readings,
            unread_sockets_max: samples.iter().map(|s| s.sockets).max().unwrap_or(0),
            unread_total_bytes_max: samples.iter().map(|s| s.total_bytes).max().unwrap_or(0),
            unread_total_bytes_mean: samples.iter().map(|s| s.total_bytes as f64).sum::<f64>()
                / readings.max(1) as f64,
            unread_socket_bytes_max: samples.iter().map(|s| s.max_bytes).max().unwrap_or(0),
            readings_with_unread: samples.iter().filter(|s| s.total_bytes > 0).count(),
        }
    }
}

fn ping_loop(port: u16, stop: &AtomicBool) -> PingResult {
    let latency = Shards::new();
    let mut failures = 0;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut connection: Option<TcpStream> = None;
    while !stop.load(Ordering::Relaxed) {
        let stream = match connection.take() {
            Some(stream) => Some(stream),
            None => TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                .ok()
                .filter(|s| s.set_read_timeout(Some(Duration::from_secs(5))).is_ok()),
        };
        let Some(mut stream) = stream else {
            failures += 1;
            std::thread::sleep(PING_EVERY);
            continue;
        };
        let sent = Instant::now();
        let mut reply = [0u8; 7];
        if stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
        {
            latency.record(0, sent.elapsed());
            connection = Some(stream);
        } else {
            failures += 1;
        }
        std::thread::sleep(PING_EVERY);
    }
    PingResult { latency, failures }
}

/// Unread bytes of every established socket whose peer is Redis's port,
/// from `ss -tnH state established dport = :PORT` (Recv-Q is the first
/// number of each line).
fn unread_bytes(port: u16) -> Option<UnreadSample> {
    let output = Command::new("ss")
        .args([
            "-tnH",
            "state",
            "established",
            "dport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut sample = UnreadSample {
        sockets: 0,
        total_bytes: 0,
        max_bytes: 0,
    };
    for line in text.lines() {
        let Some(recv_q) = line
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        sample.sockets += 1;
        sample.total_bytes += recv_q;
        sample.max_bytes = sample.max_bytes.max(recv_q);
    }
    Some(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_lines_parse() {
        let info = "# Commandstats\r\ncmdstat_evalsha:calls=3,usec=60,usec_per_call=20.00,rejected_calls=0,failed_calls=1\r\ncmdstat_ping:calls=10,usec=5,usec_per_call=0.50,rejected_calls=0,failed_calls=0\r\n";
        let stats = parse_commandstats(info);
        assert_eq!(stats.len(), 2);
        assert_eq!(stats[0].command, "evalsha");
        assert_eq!(
            (stats[0].calls, stats[0].usec, stats[0].failed_calls),
            (3, 60, 1)
        );
        assert!((stats[1].usec_per_call - 0.5).abs() < 1e-9);
    }
}
