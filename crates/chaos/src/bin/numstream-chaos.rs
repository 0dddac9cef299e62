//! `numstream-chaos`: the chaos run (see `numstream_chaos::run`).
//!
//! ```sh
//! cargo build -p numstream-server-cli -p numstream-chaos
//! target/debug/numstream-chaos --profile short            # about a minute
//! target/debug/numstream-chaos --profile long --seed 7    # thousands of sessions, an attacker beside them
//! target/debug/numstream-chaos --profile short --attack hog,churn,slowloris
//! ```
//!
//! Exits 0 when every client passed, 1 otherwise; the last line of stdout is
//! `N passed, N failed`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use numstream_chaos::attack::AttackKind;
use numstream_chaos::plan::FaultKind;
use numstream_chaos::run::{ChaosConfig, StoreMode};
use numstream_harness::redis_cluster::RedisCluster;
use rand::{RngExt, SeedableRng};

/// Puts real numstream servers and clients through seeded network faults,
/// server kills and CPU starvation, and checks every client against the fault-free reference.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// `short` (about a minute, run in CI) or `long` (thousands of sessions).
    #[arg(long, default_value = "short")]
    profile: String,
    /// Seed of everything random in the run; printed, so any run replays.
    #[arg(long)]
    seed: Option<u64>,
    /// Override the profile's number of server instances.
    #[arg(long)]
    servers: Option<usize>,
    /// Override the profile's number of clients.
    #[arg(long)]
    clients: Option<usize>,
    /// Override how many clients run at once.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Override how many times a server is killed and restarted.
    #[arg(long)]
    kills: Option<usize>,
    /// Override how many times a server is starved of CPU (SIGSTOP/SIGCONT
    /// duty cycles for a few seconds); 0 for none.
    #[arg(long)]
    starves: Option<usize>,
    /// Override the most faults one client's connections get.
    #[arg(long)]
    max_faults: Option<u32>,
    /// Fault kinds to inject, comma-separated (default: all).
    #[arg(long, value_delimiter = ',', value_parser = FaultKind::parse_arg)]
    faults: Option<Vec<FaultKind>>,
    /// Share sessions through a Redis store (starts its own redis-server):
    /// then a killed instance loses nothing and every client must pass.
    #[arg(long)]
    redis: bool,
    /// Share sessions through a local Redis Cluster instead (three masters
    /// with a replica each, started here), and kill one master at a random
    /// moment of the kill window: its replica takes over, and every client
    /// must still pass.
    #[arg(long, conflicts_with = "redis")]
    redis_cluster: bool,
    /// Never strike between a complete OPEN and its WELCOME. Faster: a lost
    /// first WELCOME makes the client wait about a session TTL for the
    /// orphaned session to expire.
    #[arg(long)]
    protect_welcome: bool,
    /// Run only this client (as printed in a failure's replay line).
    #[arg(long)]
    client: Option<usize>,
    /// The numstream-server binary. Default: next to this one.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Where server logs go. Default: a directory in the system temp dir.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// List every client with what happened to each of its connections.
    #[arg(long)]
    verbose: bool,
    /// An abusive client beside the honest ones, against every server from
    /// 127.66.0.x: comma-separated kinds of hog (holds connections with
    /// sessions it never reads), churn (open-and-drop loops), slowloris
    /// (silent or partial handshakes), or none. Default: all in the long
    /// profile, none in the short one.
    #[arg(long, value_name = "KINDS", value_parser = parse_attack)]
    attack: Option<Attacks>,
    /// Most connections the attacker holds at once, over all servers (cut to
    /// what the open-file limit leaves).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    attack_connections: Option<u32>,
    /// Opens per second of each churn task (2 per server).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    attack_rate: Option<u32>,
    /// Spread the honest clients over this many source addresses (127.1.x.y)
    /// instead of one each; 1 puts them all behind one address, like a NAT.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65_024))]
    client_addresses: Option<u32>,
    /// Pass ARG to every numstream-server (repeat for more), e.g.
    /// `--server-arg=--max-connections=50`.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    server_arg: Vec<String>,
    /// Everything over TLS: certificates made for this run, the servers
    /// started with --tls-cert/--tls-key, the clients with TLS (the faults
    /// then strike TLS records; the attacker, which speaks plaintext, is
    /// refused at the door)
    #[arg(long)]
    tls: bool,
}

/// Attack kinds as `--attack` takes them (an empty list is `none`).
#[derive(Debug, Clone)]
struct Attacks(Vec<AttackKind>);

fn parse_attack(text: &str) -> Result<Attacks, String> {
    AttackKind::parse_list(text).map(Attacks)
}

fn default_server_bin() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot locate this executable")?;
    let bin = me.with_file_name(format!("numstream-server{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        bail!(
            "{} not found: build it first (cargo build -p numstream-server-cli, with the same \
             profile as numstream-chaos) or pass --server-bin",
            bin.display()
        );
    }
    Ok(bin)
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("numstream-chaos: {error:#}");
            ExitCode::from(2)
        }
    }
}

#[tokio::main]
async fn real_main() -> anyhow::Result<bool> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    let server_bin = match args.server_bin {
        Some(bin) => bin,
        None => default_server_bin()?,
    };
    let Some(mut config) = ChaosConfig::profile(&args.profile, seed, server_bin) else {
        bail!("unknown profile {:?}: use short or long", args.profile);
    };
    if let Some(servers) = args.servers {
        config.servers = servers.max(1);
    }
    if let Some(clients) = args.clients {
        config.clients = clients;
    }
    if let Some(concurrency) = args.concurrency {
        config.concurrency = concurrency.max(1);
    }
    if let Some(kills) = args.kills {
        config.kills = kills;
    }
    if let Some(starves) = args.starves {
        config.starve.count = starves;
    }
    if let Some(max_faults) = args.max_faults {
        config.faults.max_faults = max_faults;
    }
    if let Some(kinds) = args.faults {
        config.faults.kinds = kinds;
    }
    config.faults.protect_first_welcome = args.protect_welcome;
    config.only_client = args.client;
    config.verbose = args.verbose;
    if let Some(dir) = args.log_dir {
        config.log_dir = dir;
    }
    if let Some(Attacks(kinds)) = args.attack {
        config.attack.kinds = kinds;
    }
    if let Some(connections) = args.attack_connections {
        config.attack.max_connections = connections as usize;
    }
    if let Some(rate) = args.attack_rate {
        config.attack.churn_rate = rate;
    }
    config.client_addresses = args.client_addresses.map(|n| n as usize);
    config.server_args = args.server_arg;
    // Kept alive (its files on disk) for the whole run when used.
    let _pki = if args.tls {
        let pki = numstream_harness::tls::TestPki::generate();
        let path = |path: &std::path::Path| path.display().to_string();
        config.server_args.extend([
            format!("--tls-cert={}", path(&pki.server.cert)),
            format!("--tls-key={}", path(&pki.server.key)),
        ]);
        config.tls = Some(
            numstream_client::ClientTls::new(&numstream_client::TlsOptions {
                ca: Some(pki.ca.clone()),
                ..numstream_client::TlsOptions::default()
            })
            .context("the generated CA loads")?,
        );
        Some(pki)
    } else {
        None
    };
    raise_open_file_limit();

    // Kept alive for the whole run when used.
    let mut _redis = None;
    let mut master_killer = None;
    if args.redis || args.redis_cluster {
        if !numstream_chaos::servers::supports_store_flag(&config.server_bin) {
            bail!(
                "{} has no --store flag yet: the Redis mode needs a server built with the \
                 Redis store integration",
                config.server_bin.display()
            );
        }
        let found = std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok();
        if !found {
            bail!("--redis needs redis-server on PATH (apt-get install -y redis-server)");
        }
    }
    if args.redis {
        let redis = numstream_harness::redis::RedisServer::start();
        config.store = StoreMode::Redis(redis.url());
        _redis = Some(redis);
    }
    if args.redis_cluster {
        let cluster = RedisCluster::start_with_replicas();
        config.store = StoreMode::Redis(cluster.url());
        master_killer = Some(kill_a_master_later(cluster, &config));
    }

    println!(
        "numstream chaos: profile {} seed {} ({} clients, {} servers); progress on stderr",
        config.profile_name, config.seed, config.clients, config.servers
    );
    // On SIGINT/SIGTERM, stop: dropping the run (and then the runtime)
    // kills every server and redis-server it started.
    let outcome = tokio::select! {
        outcome = numstream_chaos::run::run(config) => outcome?,
        signal = interrupted() => bail!("stopped by {signal}; servers killed"),
    };
    print!("{}", outcome.summary);
    if let Some(killer) = master_killer {
        // Its line says whether the kill happened within the run.
        match killer.await {
            Ok((_cluster, line)) => println!("{line}"),
            Err(error) => bail!("the master killer failed: {error}"),
        }
    }
    Ok(outcome.failed == 0)
}

/// Kills one master of `cluster` at a moment of the kill window drawn from
/// the run's seed (so a replay kills at the same moment), then waits for
/// its replica to take over; keeps the cluster until the run is over.
fn kill_a_master_later(
    cluster: RedisCluster,
    config: &numstream_chaos::run::ChaosConfig,
) -> tokio::task::JoinHandle<(Option<RedisCluster>, String)> {
    let (from, to) = config.kill_window;
    let mut rng = chacha20::ChaCha8Rng::seed_from_u64(config.seed ^ 0x6d61_7374_6572);
    let at = from + (to.saturating_sub(from)).mul_f64(rng.random::<f64>());
    tokio::spawn(async move {
        tokio::time::sleep(at).await;
        tokio::task::spawn_blocking(move || {
            let mut cluster = cluster;
            let Some(&victim) = cluster.masters().first() else {
                return (Some(cluster), "master kill: no master found".to_owned());
            };
            cluster.kill(victim);
            let killed = std::time::Instant::now();
            cluster.wait_until_ok();
            let line = format!(
                "master kill: redis-server {victim} killed {at:?} into the run; a replica took \
                 over within {:?}",
                killed.elapsed()
            );
            eprintln!("{line}");
            // Handed back to be dropped (every node killed) when the run
            // no longer needs it: the caller awaits this after the run.
            (Some(cluster), line)
        })
        .await
        .unwrap_or_else(|error| (None, format!("master kill: the killer panicked: {error}")))
    })
}

/// Raises the soft open-file limit to the hard one: the proxies hold three
/// descriptors per honest connection and the attacker one per connection,
/// and a login's usual 1024 is not enough for the long profile. The server
/// processes inherit the raised limit (their default `--max-connections`
/// follows it).
fn raise_open_file_limit() {
    let before = rlimit::Resource::NOFILE.get().ok();
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(now) if before.is_some_and(|(soft, _)| soft < now) => {
            eprintln!("numstream-chaos: open-file limit raised to {now}");
        }
        Ok(_) => {}
        Err(error) => eprintln!("numstream-chaos: cannot raise the open-file limit: {error}"),
    }
}

async fn interrupted() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            return tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "SIGINT"
}
