//! Real `numstream-server` processes, for tests and the chaos run that must
//! kill a server the hard way (SIGKILL), the polite way (SIGTERM), freeze it
//! (SIGSTOP/SIGCONT) or make it reload (SIGHUP), which an in-process server
//! cannot simulate.
//!
//! A server is started with `--port 0 --ready-file FILE`: it binds a port of
//! the kernel's choosing and writes its addresses to the file once it
//! accepts connections, so nobody races for a port and nobody polls a
//! socket. Signals are sent by syscall (rustix), not by running kill(1).
//! Stderr (the server's log) goes to a file, readable with
//! [`ServerProcess::log`] when a test fails; stdout, which only repeats
//! the ready file's address, is dropped. The process is killed when
//! dropped.

use std::ffi::{OsStr, OsString};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

pub use rustix::process::Signal;

/// How long a fresh server may take to report that it listens.
pub const READY_WITHIN: Duration = Duration::from_secs(10);
/// How often the ready file is looked for while a server starts.
const READY_POLL: Duration = Duration::from_millis(10);
/// Attempts to restart on the same port, which a dying process may hold
/// for a moment.
const RESTART_ATTEMPTS: usize = 10;
/// Pause between restart attempts.
const RESTART_PAUSE: Duration = Duration::from_millis(100);
/// Bound on reaping a process after SIGKILL.
const REAP_WITHIN: Duration = Duration::from_secs(10);

/// Why a server process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot run {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the log file {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{binary} exited with {status} before it listened; its log ({log}):\n{text}")]
    Exited {
        binary: PathBuf,
        status: ExitStatus,
        log: PathBuf,
        text: String,
    },
    #[error("{binary} did not report listening within {within:?}; its log ({log}):\n{text}")]
    NotReady {
        binary: PathBuf,
        within: Duration,
        log: PathBuf,
        text: String,
    },
    #[error("the ready file {path} says {text:?}, not `address=ADDR:PORT`")]
    ReadyFile { path: PathBuf, text: String },
}

/// How to run a server: the binary, its flags (besides `--port` and
/// `--ready-file`, which the harness adds), environment, open-file limit
/// and where its log goes.
#[derive(Debug, Clone)]
pub struct ServerCommand {
    binary: PathBuf,
    /// Arguments before `--port` and `--ready-file`.
    leading_args: Vec<OsString>,
    args: Vec<OsString>,
    port: u16,
    env: Vec<(OsString, OsString)>,
    open_files: Option<u64>,
    log: Option<PathBuf>,
}

impl ServerCommand {
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            leading_args: Vec::new(),
            args: Vec::new(),
            port: 0,
            env: Vec::new(),
            open_files: None,
            log: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    /// Arguments that go before `--port` and `--ready-file`: a subcommand
    /// (`numstream-bench bare-server`), or the real program and what
    /// precedes it when `binary` is a launcher (`taskset -c 0 SERVER`).
    pub fn leading_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.leading_args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    /// Listens on `port` instead of one of the kernel's choice: for
    /// processes sharing a port (`--reuse-port`) that another one chose.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Adds `key=value` to the inherited environment (e.g. `RUST_LOG`).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Lowers the process's open-file limit (the server sizes its default
    /// connection limit from it).
    pub fn open_files(mut self, limit: u64) -> Self {
        self.open_files = Some(limit);
        self
    }

    /// Appends the log to `path` and keeps it; by default it goes to a
    /// temporary file removed with the process.
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some(path.into());
        self
    }

    /// Starts the server; see [`ServerProcess::start`].
    pub async fn start(self) -> Result<ServerProcess, ProcessError> {
        ServerProcess::start(self).await
    }
}

/// A running (or deliberately stopped) server process.
#[derive(Debug)]
pub struct ServerProcess {
    command: ServerCommand,
    child: Option<Child>,
    address: SocketAddr,
    status_address: Option<SocketAddr>,
    log: PathBuf,
    ready_file: PathBuf,
    starts: u32,
}

impl ServerProcess {
    /// Starts `command` with `--port 0` (or [`ServerCommand::port`]) and
    /// waits until the server reports
    /// (in its ready file) that it accepts connections.
    pub async fn start(command: ServerCommand) -> Result<Self, ProcessError> {
        let unique = unique_name();
        let log = command
            .log
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("{unique}.log")));
        let mut server = Self {
            ready_file: std::env::temp_dir().join(format!("{unique}.ready")),
            command,
            child: None,
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            status_address: None,
            log,
            starts: 0,
        };
        let port = server.command.port;
        server.launch(port).await?;
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.address
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// The status endpoint's address, when started with `--metrics-addr`.
    pub fn status_address(&self) -> Option<SocketAddr> {
        self.status_address
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// How many times the process was started (1 + restarts).
    pub fn starts(&self) -> u32 {
        self.starts
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the server logged so far (its stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal`; nothing while the process is down.
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        match self.pid() {
            Some(pid) => self::signal(pid, signal),
            None => Ok(()),
        }
    }

    /// SIGKILL: the process dies without detaching anything, as in a crash
    /// or power loss. Waits (bounded) until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(REAP_WITHIN, child.wait()).await;
        }
    }

    /// SIGTERM, then SIGKILL if the drain takes longer than `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        if self.signal(Signal::TERM).is_ok() && self.wait_exit(grace).await.is_some() {
            return;
        }
        self.kill().await;
    }

    /// Waits (bounded) for the process to exit on its own; its status, or
    /// `None` if it still runs (or was not running).
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = tokio::time::timeout(limit, child.wait()).await.ok()?.ok()?;
        self.child = None;
        Some(status)
    }

    /// Kills the process and starts it again on the same port (retrying
    /// while the dying process still holds it).
    pub async fn restart(&mut self) -> Result<(), ProcessError> {
        self.kill().await;
        let port = self.port();
        let mut attempt = 1;
        loop {
            match self.launch(port).await {
                Ok(()) => return Ok(()),
                Err(_) if attempt < RESTART_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(RESTART_PAUSE).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn launch(&mut self, port: u16) -> Result<(), ProcessError> {
        let binary = self.command.binary.clone();
        let _ = std::fs::remove_file(&self.ready_file);
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|source| ProcessError::Log {
                path: self.log.clone(),
                source,
            })?;
        let mut command = match self.command.open_files {
            // The shell sets the limit, then becomes the server (same pid,
            // so signals reach it).
            Some(limit) => {
                let mut shell = Command::new("sh");
                shell
                    .arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(&binary);
                shell
            }
            None => Command::new(&binary),
        };
        command
            .args(&self.command.leading_args)
            .arg("--port")
            .arg(port.to_string())
            .arg("--ready-file")
            .arg(&self.ready_file)
            .args(&self.command.args)
            .envs(self.command.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        let child = command.spawn().map_err(|source| ProcessError::Spawn {
            binary: binary.clone(),
            source,
        })?;
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.ready_file) {
                return self.read_ready(&text);
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(ProcessError::Exited {
                    binary,
                    status,
                    log: self.log.clone(),
                    text: self.log(),
                });
            }
            if Instant::now() >= deadline {
                self.kill().await;
                return Err(ProcessError::NotReady {
                    binary,
                    within: READY_WITHIN,
                    log: self.log.clone(),
                    text: self.log(),
                });
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    fn read_ready(&mut self, text: &str) -> Result<(), ProcessError> {
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
                .and_then(|value| value.parse::<SocketAddr>().ok())
        };
        self.address = field("address").ok_or_else(|| ProcessError::ReadyFile {
            path: self.ready_file.clone(),
            text: text.to_owned(),
        })?;
        self.status_address = field("status_address");
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_file(&self.ready_file);
        if self.command.log.is_none() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// Runs `command` to its end with stdout and stderr captured, for tests
/// of a binary that must not hang: past `limit` the process is killed and
/// the test fails with what it wrote to stderr. Blocking (for synchronous
/// tests): a thread collects the output, so a chatty process never stalls
/// on a full pipe, and nothing polls.
pub fn output_within(command: &mut std::process::Command, limit: Duration) -> std::process::Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let (output, timed_out) = match finished.recv_timeout(limit) {
        Ok(output) => (output, false),
        Err(_) => {
            let _ = signal(pid, Signal::KILL);
            let output = finished
                .recv()
                .unwrap_or_else(|_| Err(io::Error::other("the output thread died")));
            (output, true)
        }
    };
    let output = output.unwrap_or_else(|error| panic!("reading {command:?}'s output: {error}"));
    assert!(
        !timed_out,
        "{command:?} still running after {limit:?}; its stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Sends `signal` to process `pid`.
pub fn signal(pid: u32, signal: Signal) -> io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::other(format!("{pid} is not a process id")))?;
    rustix::process::kill_process(pid, signal)?;
    Ok(())
}

/// A name no other process or server of this process uses, for temporary
/// files.
pub(crate) fn unique_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "numstream-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
