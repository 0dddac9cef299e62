//! `numstream-chaos`: the chaos run (see `numstream_chaos::run`).
//!
//! ```sh
//! cargo build -p numstream-server -p numstream-chaos
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
use rand::RngExt;

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
            "{} not found: build it first (cargo build -p numstream-server, with the same \
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
    raise_open_file_limit();

    // Kept alive for the whole run when used.
    let mut _redis = None;
    if args.redis {
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
        let redis = numstream_testkit::redis::RedisServer::start();
        config.store = StoreMode::Redis(redis.url());
        _redis = Some(redis);
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
    Ok(outcome.failed == 0)
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
