//! `numstream-chaos`: the chaos run (see `numstream_chaos::run`).
//!
//! ```sh
//! cargo build -p numstream-server -p numstream-chaos
//! target/debug/numstream-chaos --profile short            # about a minute
//! target/debug/numstream-chaos --profile long --seed 7    # thousands of sessions
//! ```
//!
//! Exits 0 when every client passed, 1 otherwise; the last line of stdout is
//! `N passed, N failed`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use numstream_chaos::plan::FaultKind;
use numstream_chaos::run::{ChaosConfig, StoreMode};
use rand::RngExt;

/// Puts real numstream servers and clients through seeded network faults and
/// server kills, and checks every client against the fault-free reference.
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
