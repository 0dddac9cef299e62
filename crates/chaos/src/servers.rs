//! Real `numstream-server` processes on loopback ports: started, killed
//! (SIGKILL, or SIGTERM for a graceful drain), restarted on the same port,
//! and frozen and thawed (SIGSTOP/SIGCONT) for the starve fault.

use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use rustix::process::{Pid, Signal as PosixSignal, kill_process};
use tokio::time::Instant;

/// How long a fresh server may take to accept connections.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// Ports tried when another process wins the race for a probed port.
const PORT_ATTEMPTS: usize = 5;
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
    port: u16,
    spec: ServerSpec,
    child: Option<Child>,
    starts: u32,
}

impl ServerProcess {
    /// Starts instance `index` on a free port and waits until it accepts.
    pub async fn start(index: usize, spec: &ServerSpec) -> anyhow::Result<Self> {
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let mut server = Self {
                index,
                port: free_port()?,
                spec: spec.clone(),
                child: None,
                starts: 0,
            };
            match server.launch().await {
                Ok(()) => return Ok(server),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
            .with_context(|| format!("server {index} did not start"))
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// How many times the process was started (1 + restarts).
    pub fn starts(&self) -> u32 {
        self.starts
    }

    pub fn log_path(&self) -> PathBuf {
        log_path(&self.spec.log_dir, self.index)
    }

    /// Stops the process with `signal` and waits for it to exit (bounded:
    /// a SIGTERM that does not drain in time is followed by SIGKILL).
    pub async fn stop(&mut self, signal: Signal) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if signal == Signal::Term {
            let _ = kill_process(Pid::from_child(&child), PosixSignal::TERM);
            let deadline = Instant::now() + TERM_GRACE;
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Freezes the process (SIGSTOP): it gets no CPU at all until
    /// [`ServerProcess::thaw`], while the kernel keeps accepting and
    /// buffering on its sockets, as for a process whose CPU quota ran out.
    /// No-op while it is down.
    pub fn freeze(&self) -> std::io::Result<()> {
        self.send(PosixSignal::STOP)
    }

    /// Lets a frozen process run again (SIGCONT); harmless on one that runs.
    pub fn thaw(&self) -> std::io::Result<()> {
        self.send(PosixSignal::CONT)
    }

    fn send(&self, signal: PosixSignal) -> std::io::Result<()> {
        match &self.child {
            Some(child) => Ok(kill_process(Pid::from_child(child), signal)?),
            None => Ok(()),
        }
    }

    /// Starts the process again on the same port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop(Signal::Kill).await;
        // The port may still be in use for a moment; a few tries.
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            match self.launch().await {
                Ok(()) => return Ok(()),
                Err(error) => last_error = Some(error),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
            .with_context(|| format!("server {} did not restart", self.index))
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let log = open_log(&self.log_path())?;
        let mut command = match self.spec.open_files {
            // The shell sets the limit, then becomes the server (same pid,
            // so the harness's signals reach it).
            Some(limit) => {
                let mut shell = Command::new("sh");
                shell
                    .arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(&self.spec.bin);
                shell
            }
            None => Command::new(&self.spec.bin),
        };
        command
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1"])
            .arg("--interval")
            .arg(humantime::format_duration(self.spec.interval).to_string())
            .arg("--session-ttl")
            .arg(humantime::format_duration(self.spec.session_ttl).to_string())
            .arg("--seed")
            .arg(self.spec.seed.to_string())
            .args(["--shutdown-grace", "3s"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(url) = &self.spec.store_url {
            command.arg("--store").arg(url);
        }
        command.args(&self.spec.extra_args);
        let child = command
            .spawn()
            .with_context(|| format!("cannot run {}", self.spec.bin.display()))?;
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                bail!(
                    "server {} on port {} exited with {status}; log: {}",
                    self.index,
                    self.port,
                    self.log_path().display()
                );
            }
            if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop(Signal::Kill).await;
                bail!(
                    "server {} on port {} did not accept connections within {READY_WITHIN:?}; log: {}",
                    self.index,
                    self.port,
                    self.log_path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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

fn open_log(path: &Path) -> anyhow::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create log directory {}", dir.display()))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("probe a free port")?;
    Ok(listener.local_addr()?.port())
}
