//! The chaos run's server instances: how each is started (its flags, from
//! the run's [`ServerSpec`]) and numbered. Starting, signalling (SIGKILL,
//! SIGTERM, SIGSTOP/SIGCONT) and restarting on the same port are the
//! harness's process manager's ([`numstream_harness::process`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use numstream_harness::process::{self, ServerCommand};

/// After SIGTERM, how long the drain may take before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(8);

/// How every server instance of a run is started.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub bin: PathBuf,
    pub interval: Duration,
    pub session_ttl: Duration,
    pub seed: u64,
    /// `--store URL` (a shared Redis store); `None` for the in-memory store.
    pub store_url: Option<String>,
    pub log_dir: PathBuf,
    /// Passed on after the harness's own flags (e.g. `--max-connections 50`).
    pub extra_args: Vec<String>,
    /// The servers' open-file limit, when the run sets one: a server sizes
    /// its connection limit, and with it every per-address share, from it.
    pub open_files: Option<u64>,
}

impl ServerSpec {
    fn command(&self, index: usize) -> anyhow::Result<ServerCommand> {
        let log = log_path(&self.log_dir, index);
        std::fs::create_dir_all(&self.log_dir)
            .with_context(|| format!("cannot create log directory {}", self.log_dir.display()))?;
        let mut command = ServerCommand::new(&self.bin)
            .args(["--bind", "127.0.0.1"])
            .arg("--interval")
            .arg(humantime::format_duration(self.interval).to_string())
            .arg("--session-ttl")
            .arg(humantime::format_duration(self.session_ttl).to_string())
            .arg("--seed")
            .arg(self.seed.to_string())
            .args(["--shutdown-grace", "3s"])
            .env("RUST_LOG", "info")
            .log_file(log);
        if let Some(url) = &self.store_url {
            command = command.arg("--store").arg(url);
        }
        command = command.args(&self.extra_args);
        if let Some(limit) = self.open_files {
            command = command.open_files(limit);
        }
        Ok(command)
    }
}

/// How to stop an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGKILL: no drain, no goodbye; clients see their connections reset.
    Kill,
    /// SIGTERM: the server drains and tells its clients.
    Term,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Self::Kill => "SIGKILL",
            Self::Term => "SIGTERM",
        }
    }
}

/// One server instance. Dropping it kills the process.
#[derive(Debug)]
pub struct ServerProcess {
    index: usize,
    process: process::ServerProcess,
}

impl ServerProcess {
    /// Starts instance `index` on a port of its choosing and waits until it
    /// accepts.
    pub async fn start(index: usize, spec: &ServerSpec) -> anyhow::Result<Self> {
        let process = spec
            .command(index)?
            .start()
            .await
            .with_context(|| format!("server {index} did not start"))?;
        Ok(Self { index, process })
    }

    pub fn addr(&self) -> SocketAddr {
        self.process.addr()
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// How many times the process was started (1 + restarts).
    pub fn starts(&self) -> u32 {
        self.process.starts()
    }

    pub fn log_path(&self) -> PathBuf {
        self.process.log_path().to_owned()
    }

    /// Stops the process with `signal` and waits for it to exit (bounded:
    /// a SIGTERM that does not drain in time is followed by SIGKILL).
    pub async fn stop(&mut self, signal: Signal) {
        match signal {
            Signal::Kill => self.process.kill().await,
            Signal::Term => self.process.stop(TERM_GRACE).await,
        }
    }

    /// Freezes the process (SIGSTOP): it gets no CPU at all until
    /// [`ServerProcess::thaw`], while the kernel keeps accepting and
    /// buffering on its sockets, as for a process whose CPU quota ran out.
    /// No-op while it is down.
    pub fn freeze(&self) -> std::io::Result<()> {
        self.process.signal(process::Signal::STOP)
    }

    /// Lets a frozen process run again (SIGCONT); harmless on one that runs.
    pub fn thaw(&self) -> std::io::Result<()> {
        self.process.signal(process::Signal::CONT)
    }

    /// Starts the process again on the same port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process
            .restart()
            .await
            .with_context(|| format!("server {} did not restart", self.index))
    }
}

/// Whether the server binary takes `--store URL` (the shared Redis store).
pub fn supports_store_flag(bin: &Path) -> bool {
    Command::new(bin)
        .arg("--help")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("--store"))
        .unwrap_or(false)
}

fn log_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("server-{index}.log"))
}
