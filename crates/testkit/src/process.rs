//! `ServerProcess`: a real `numstream-server` binary on a free port, for
//! tests that must kill a server the hard way (SIGKILL) or the polite way
//! (SIGTERM), which an in-process server cannot simulate.
//!
//! The binary's path comes from the caller (`env!("CARGO_BIN_EXE_numstream-server")`
//! in the server crate's integration tests). Stderr (the server's log) goes
//! to a file, readable with [`ServerProcess::log`] when a test fails. The
//! process is killed when dropped.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh server may take to accept connections.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// Fresh ports tried when another process takes the probed one first.
const PORT_ATTEMPTS: usize = 5;

/// A running (or deliberately stopped) server process owned by a test.
#[derive(Debug)]
pub struct ServerProcess {
    port: u16,
    child: Child,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts `binary --port <free port> <args>` and waits until it
    /// accepts connections.
    ///
    /// # Panics
    /// If the binary cannot run or never listens.
    pub fn start(binary: &Path, args: &[&str]) -> Self {
        Self::start_with_env(binary, args, &[])
    }

    /// [`start`](Self::start), with `env` added to the inherited
    /// environment (e.g. `RUST_LOG`).
    ///
    /// # Panics
    /// If the binary cannot run or never listens.
    pub fn start_with_env(binary: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_with(binary, args, env, None)
    }

    /// [`start_with_env`](Self::start_with_env), with the process's
    /// open-file limit lowered to `open_files` when given (the server sizes
    /// its default connection limit from it).
    ///
    /// # Panics
    /// If the binary cannot run or never listens.
    pub fn start_with(
        binary: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        open_files: Option<u64>,
    ) -> Self {
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let log = std::env::temp_dir().join(format!(
                "numstream-server-{}-{port}.log",
                std::process::id()
            ));
            let log_file = std::fs::File::create(&log)
                .unwrap_or_else(|error| panic!("cannot create {}: {error}", log.display()));
            let mut command = match open_files {
                // The shell sets the limit, then becomes the server (same
                // pid, so signals reach it).
                Some(limit) => {
                    let mut shell = Command::new("sh");
                    shell
                        .arg("-c")
                        .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                        .arg(binary);
                    shell
                }
                None => Command::new(binary),
            };
            let child = command
                .arg("--port")
                .arg(port.to_string())
                .args(args)
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|error| panic!("cannot run {}: {error}", binary.display()));
            let mut server = Self { port, child, log };
            match server.wait_until_listening() {
                Ok(()) => return server,
                Err(why) => last_error = why,
            }
        }
        panic!("numstream-server did not start after {PORT_ATTEMPTS} ports: {last_error}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the process dies without detaching anything, as in a crash
    /// or power loss. Waits until it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: asks for a graceful drain. Does not wait.
    ///
    /// # Panics
    /// If the signal cannot be sent.
    pub fn terminate(&mut self) {
        signal(self.child.id(), "TERM");
    }

    /// Waits (bounded) for the process to exit on its own.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The status endpoint's address (`--metrics-addr`, which may ask for
    /// port 0), as the server logs it at startup.
    ///
    /// # Panics
    /// If the log names none.
    pub fn status_address(&self) -> SocketAddr {
        let log = self.log();
        let line = log
            .lines()
            .find(|line| line.contains("status endpoint listening"))
            .unwrap_or_else(|| panic!("no status endpoint in the log:\n{log}"));
        let start = line
            .find("status_address")
            .unwrap_or_else(|| panic!("no address in {line}"));
        let address: String = line[start + "status_address".len()..]
            .trim_start_matches(['=', '"', ':'])
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        address
            .parse()
            .unwrap_or_else(|error| panic!("{address:?} in {line}: {error}"))
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_until_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "exited with {status} before listening on {}: {}",
                    self.port,
                    self.log()
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "numstream-server did not listen on {} within {READY_WITHIN:?}: {}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Sends `SIG<name>` to `pid` with kill(1).
///
/// # Panics
/// If kill(1) cannot run or fails.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap_or_else(|error| panic!("cannot run kill: {error}"));
    assert!(status.success(), "kill -{name} {pid} failed: {status}");
}

/// A port that was free a moment ago; whoever binds it must retry with a
/// new one if another process got there first.
pub(crate) fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|error| panic!("cannot bind a probe socket on 127.0.0.1: {error}"));
    listener
        .local_addr()
        .unwrap_or_else(|error| panic!("probe socket has no address: {error}"))
        .port()
}
