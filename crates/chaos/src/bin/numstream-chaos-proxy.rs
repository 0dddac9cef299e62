//! `numstream-chaos-proxy`: the fault-injecting proxy on its own, for manual
//! experiments. Every connection's plan and every fault that strikes is
//! logged to stderr; the same seed gives the same plans.
//!
//! ```sh
//! numstream-chaos-proxy --listen 127.0.0.1:7100 --upstream 127.0.0.1:7000 --seed 42
//! numstream-client --port 7100 --count 500
//! ```

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use numstream_chaos::plan::{FaultKind, FaultProfile, Schedule};
use numstream_chaos::proxy::FaultProxy;
use tracing_subscriber::EnvFilter;

/// Forwards TCP between numstream clients and a server on loopback, injecting
/// seeded faults: close (FIN), reset (RST), stall, latency, 1-byte writes and
/// half-close.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (loopback only), e.g. 127.0.0.1:7100.
    #[arg(long)]
    listen: SocketAddr,
    /// Server to forward to (loopback only), e.g. 127.0.0.1:7000.
    #[arg(long)]
    upstream: SocketAddr,
    /// Connect upstream from this (loopback) address, e.g. 127.1.0.7, so the
    /// server sees the proxied clients as that peer. Default: the kernel's
    /// choice.
    #[arg(long)]
    source: Option<IpAddr>,
    /// Seed of the fault schedule; the same seed gives the same plans.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stream number mixed into the seed (one per client in chaos runs).
    #[arg(long, default_value_t = 0)]
    stream: u64,
    /// Chance that a connection gets a fault.
    #[arg(long, default_value_t = 0.5)]
    fault_probability: f64,
    /// Connections from this one on get no fault.
    #[arg(long, default_value_t = u32::MAX)]
    max_faults: u32,
    /// Fault kinds to draw from, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "close,reset,stall,half-close", value_parser = FaultKind::parse_arg)]
    faults: Vec<FaultKind>,
    /// Byte triggers fall in 1..=this many bytes.
    #[arg(long, default_value_t = 2_000)]
    max_trigger_bytes: u64,
    /// Time triggers fall in 50ms..=this.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    max_trigger_time: Duration,
    /// How long a stalled or half-closed connection is held open.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Chance that a connection gets added latency.
    #[arg(long, default_value_t = 0.2)]
    latency_probability: f64,
    #[arg(long, default_value = "30ms", value_parser = humantime::parse_duration)]
    max_latency: Duration,
    /// Chance that a connection forwards one direction one byte at a time.
    #[arg(long, default_value_t = 0.15)]
    split_probability: f64,
    /// Never strike between a complete OPEN and its WELCOME (a lost first
    /// WELCOME makes the client wait about a session TTL for the orphaned
    /// session to expire).
    #[arg(long)]
    protect_welcome: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let profile = FaultProfile {
        fault_probability: args.fault_probability,
        max_faults: args.max_faults,
        kinds: args.faults,
        max_trigger_bytes: args.max_trigger_bytes,
        max_trigger_time: args.max_trigger_time,
        hold: args.hold,
        latency_probability: args.latency_probability,
        max_latency: args.max_latency,
        split_probability: args.split_probability,
        protect_first_welcome: args.protect_welcome,
        ..FaultProfile::default()
    };
    let schedule = Schedule::new(args.seed, args.stream, profile);
    let proxy = FaultProxy::start_from(args.listen, args.upstream, args.source, schedule)
        .await
        .context("cannot start the proxy")?;
    tracing::info!(
        listen = %proxy.addr(),
        upstream = %args.upstream,
        seed = args.seed,
        stream = args.stream,
        "chaos proxy running; Ctrl-C stops it"
    );
    tokio::signal::ctrl_c().await?;
    let stats = proxy.stats();
    tracing::info!(
        connections = stats.connections,
        faults = stats.total_faults(),
        "stopped"
    );
    Ok(())
}
