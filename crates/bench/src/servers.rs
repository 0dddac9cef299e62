//! The servers under test: numstream or bare, spawned as separate processes
//! (so their CPU and memory can be read from /proc; optionally confined to
//! some CPUs, and with a status endpoint each whose `/metrics` is read at
//! the end), run inside the load generator, or given as external addresses
//! and pids.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use numstream_harness::process::{ServerCommand, ServerProcess};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cpus::CpuList;
use crate::procfs::ProcSample;

/// The per-address limits of numstream-server. The load generator's few
/// source addresses (16 by default) stand for thousands of distinct
/// clients, so each spawned server gets `FLAG 0` (no per-address limit;
/// the global `--max-connections` and `--max-sessions` still apply) for
/// every one of these the `--server-arg`s do not set. With the defaults,
/// `--per-address-session-rate` 50/s alone would turn a 19,000-session
/// ramp-up over 10 s (about 120 new sessions a second per address) into
/// `server_busy` refusals that only measure the quota.
const PER_ADDRESS_LIMITS: [&str; 4] = [
    "--per-address-connections",
    "--per-address-handshakes",
    "--per-address-sessions",
    "--per-address-session-rate",
];

/// Which server a measurement runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Flavor {
    /// The minimal tokio program of `bare.rs`.
    Bare,
    /// numstream-server with the in-memory store.
    Numstream,
    /// numstream-server with the in-memory store, over TLS (`--tls`): a
    /// certificate made for the run, clients trusting its CA.
    #[serde(rename = "numstream-tls")]
    NumstreamTls,
}

impl Flavor {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Flavor::Bare => "bare",
            Flavor::Numstream => "numstream",
            Flavor::NumstreamTls => "numstream-tls",
        }
    }

    /// Whether this is numstream-server (whose sessions the client library
    /// verifies), over TLS or not.
    pub(crate) fn is_numstream(self) -> bool {
        matches!(self, Flavor::Numstream | Flavor::NumstreamTls)
    }
}

/// Where the servers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Placement {
    /// Separate processes of `numstream-server` / `numstream-bench
    /// bare-server` (CPU and RSS are theirs alone).
    Spawn,
    /// Inside the load generator (CPU and RSS include the clients).
    Inproc,
}

/// How to find or start the servers.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServerOptions {
    /// Server processes per flavor; sessions are spread over them round
    /// robin, each on its own port.
    #[arg(long, default_value_t = 1)]
    pub(crate) servers: usize,
    /// Run the servers as separate processes or inside the load generator.
    #[arg(long, value_enum, default_value = "spawn")]
    pub(crate) placement: Placement,
    /// The numstream-server binary (default: next to this binary; build it
    /// with `cargo build --release -p numstream-server-cli`).
    #[arg(long)]
    pub(crate) server_bin: Option<PathBuf>,
    /// Use already running numstream servers at these addresses instead of
    /// starting them (repeatable).
    #[arg(long = "connect")]
    pub(crate) external: Vec<SocketAddr>,
    /// Pids of the external servers, for their CPU and RSS (repeatable).
    #[arg(long = "server-pid")]
    pub(crate) external_pids: Vec<u32>,
    /// Use already running bare servers (`numstream-bench bare-server`) at
    /// these addresses instead of starting them (repeatable).
    #[arg(long = "bare-connect")]
    pub(crate) external_bare: Vec<SocketAddr>,
    /// Pids of the external bare servers (repeatable).
    #[arg(long = "bare-pid")]
    pub(crate) external_bare_pids: Vec<u32>,
    /// Where spawned numstream servers log (default: a temporary file,
    /// removed when they stop, shown if one fails to start).
    #[arg(long)]
    pub(crate) server_log: Option<PathBuf>,
    /// Extra argument for every spawned numstream server (repeatable), e.g.
    /// `--server-arg=--store --server-arg=redis://127.0.0.1:6390/0`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub(crate) server_args: Vec<String>,
    /// Spawn every server process of a flavor on one port with
    /// SO_REUSEPORT (numstream-server --reuse-port), letting the kernel
    /// spread connections, instead of one port per process.
    #[arg(long)]
    pub(crate) reuse_port: bool,
    /// Confine every spawned server process (numstream and bare) to these
    /// CPUs, e.g. `0` or `0-1,3`: each runs under `taskset -c LIST`, and
    /// its tokio runtime sizes itself to them.
    #[arg(long, value_name = "LIST")]
    pub(crate) server_cpus: Option<CpuList>,
    /// Give every spawned numstream server a status endpoint on a free
    /// port (`--metrics-addr`) and put the sum of their `/metrics`
    /// counters and histograms in the report, read just before they stop.
    #[arg(long)]
    pub(crate) server_metrics: bool,
    /// The certificate the `numstream-tls` servers serve, made for the run
    /// (`Common::prepare_tls`).
    #[arg(skip)]
    pub(crate) tls: Option<TlsMaterial>,
}

/// A CA, and a server certificate it signed for `127.0.0.1`, on disk for
/// the length of a run.
#[derive(Debug, Clone)]
pub(crate) struct TlsMaterial {
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

impl ServerOptions {
    fn tls_material(&self) -> anyhow::Result<&TlsMaterial> {
        self.tls
            .as_ref()
            .context("the numstream-tls flavor needs a certificate: run with --tls")
    }
}

/// Running servers of one flavor.
#[derive(Debug)]
pub(crate) struct Servers {
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) pids: Vec<u32>,
    /// Status endpoints of spawned numstream servers (`--server-metrics`).
    pub(crate) metrics: Vec<SocketAddr>,
    /// Spawned servers, killed when dropped.
    processes: Vec<ServerProcess>,
    inproc: Option<CancellationToken>,
}

impl Servers {
    /// Starts (or adopts) the servers; each accepts connections on return.
    pub(crate) async fn start(
        flavor: Flavor,
        options: &ServerOptions,
        interval: Duration,
    ) -> anyhow::Result<Self> {
        let mut servers = Servers {
            addrs: Vec::new(),
            pids: Vec::new(),
            metrics: Vec::new(),
            processes: Vec::new(),
            inproc: None,
        };
        let (external, pids) = match flavor {
            Flavor::Numstream => (&options.external, &options.external_pids),
            Flavor::Bare => (&options.external_bare, &options.external_bare_pids),
            // Only a server started here has the run's certificate.
            Flavor::NumstreamTls => {
                if !options.external.is_empty() {
                    bail!("--tls starts its own servers: it cannot measure --connect ones");
                }
                (&options.external, &options.external_pids)
            }
        };
        if !external.is_empty() {
            servers.addrs = external.clone();
            servers.pids = pids.clone();
            return Ok(servers);
        }
        let processes = options.servers.max(1);
        match options.placement {
            Placement::Inproc => {
                let stop = CancellationToken::new();
                for _ in 0..processes {
                    let listener = numstream_server::listen(
                        SocketAddr::from(([127, 0, 0, 1], 0)),
                        numstream_server::ListenOptions::default(),
                    )?;
                    servers.addrs.push(listener.local_addr()?);
                    let tls = match flavor {
                        Flavor::NumstreamTls => {
                            let material = options.tls_material()?;
                            Some(Arc::new(numstream_server::ServerTls::load(
                                numstream_server::TlsFiles {
                                    cert: material.cert.clone(),
                                    key: material.key.clone(),
                                    client_ca: None,
                                },
                            )?))
                        }
                        Flavor::Bare | Flavor::Numstream => None,
                    };
                    tokio::spawn(serve_inproc(flavor, listener, interval, tls, stop.clone()));
                }
                servers.pids.push(std::process::id());
                servers.inproc = Some(stop);
            }
            Placement::Spawn => {
                // With --reuse-port the first process picks the port (the
                // kernel's choice, read from its ready file) and the others
                // share it.
                let mut shared_port = None;
                for _ in 0..processes {
                    let mut command = spawn_command(flavor, options, interval)?;
                    if let Some(port) = shared_port {
                        command = command.port(port);
                    }
                    let process = command
                        .start()
                        .await
                        .with_context(|| format!("starting the {} server", flavor.name()))?;
                    if options.reuse_port {
                        shared_port = Some(process.port());
                    }
                    servers.pids.extend(process.pid());
                    servers.metrics.extend(process.status_address());
                    // One address for all when they share a port: the
                    // kernel, not the load generator, spreads the load.
                    if !servers.addrs.contains(&process.addr()) {
                        servers.addrs.push(process.addr());
                    }
                    servers.processes.push(process);
                }
            }
        }
        // Every listener is listening by now: in-process ones are bound
        // above, and each process reported in its ready file.
        Ok(servers)
    }

    /// CPU and RSS of every server process right now.
    pub(crate) fn sample(&self) -> Vec<ProcSample> {
        self.pids
            .iter()
            .filter_map(|&pid| ProcSample::read(pid))
            .collect()
    }

    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.inproc.take() {
            stop.cancel();
        }
        for process in &mut self.processes {
            process.kill().await;
        }
    }
}

async fn serve_inproc(
    flavor: Flavor,
    listener: TcpListener,
    interval: Duration,
    tls: Option<Arc<numstream_server::ServerTls>>,
    stop: CancellationToken,
) {
    match flavor {
        Flavor::Bare => {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = crate::bare::serve(listener) => {}
            }
        }
        Flavor::Numstream | Flavor::NumstreamTls => {
            let config = numstream_server::ServerConfig {
                interval,
                tls,
                max_connections: 200_000,
                // As for spawned servers (see PER_ADDRESS_LIMITS).
                per_address: numstream_server::PeerLimits::UNLIMITED,
                ..Default::default()
            };
            let store = Arc::new(numstream_store::InMemoryStore::new(200_000));
            let _ = numstream_server::run(listener, store, config, stop).await;
        }
    }
}

impl ServerOptions {
    /// Whether the `--server-arg`s set `flag` (as `FLAG VALUE` or
    /// `FLAG=VALUE`).
    pub(crate) fn sets(&self, flag: &str) -> bool {
        self.server_args.iter().any(|arg| {
            arg == flag
                || arg
                    .strip_prefix(flag)
                    .is_some_and(|rest| rest.starts_with('='))
        })
    }
}

fn server_binary(options: &ServerOptions) -> anyhow::Result<PathBuf> {
    let path = match &options.server_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("numstream-server"),
    };
    if !path.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p numstream-server-cli` or pass --server-bin",
            path.display()
        );
    }
    Ok(path)
}

/// How to start one server process of `flavor` (the harness adds `--port`
/// and `--ready-file`), under `taskset` with `--server-cpus`.
fn spawn_command(
    flavor: Flavor,
    options: &ServerOptions,
    interval: Duration,
) -> anyhow::Result<ServerCommand> {
    let program = match flavor {
        Flavor::Numstream | Flavor::NumstreamTls => server_binary(options)?,
        Flavor::Bare => std::env::current_exe()?,
    };
    let mut command = match &options.server_cpus {
        // taskset runs the server in its own place (same pid).
        Some(cpus) => ServerCommand::new("taskset").leading_args([
            OsString::from("-c"),
            OsString::from(cpus.to_string()),
            program.into_os_string(),
        ]),
        None => ServerCommand::new(program),
    };
    match flavor {
        Flavor::Numstream | Flavor::NumstreamTls => {
            command = command.args([
                "--interval".to_owned(),
                format!("{}us", interval.as_micros()),
            ]);
            if flavor == Flavor::NumstreamTls {
                let material = options.tls_material()?;
                command = command
                    .arg("--tls-cert")
                    .arg(&material.cert)
                    .arg("--tls-key")
                    .arg(&material.key);
            }
            command = command.args(&options.server_args);
            for flag in PER_ADDRESS_LIMITS {
                if !options.sets(flag) {
                    command = command.args([flag, "0"]);
                }
            }
            if options.server_metrics {
                // Its port is read from the ready file.
                command = command.args(["--metrics-addr", "127.0.0.1:0"]);
            }
            if let Some(path) = &options.server_log {
                command = command.log_file(path);
            }
        }
        Flavor::Bare => command = command.leading_args(["bare-server"]),
    }
    if options.reuse_port {
        command = command.arg("--reuse-port");
    }
    Ok(command)
}
