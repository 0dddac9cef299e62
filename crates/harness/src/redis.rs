//! `RedisServer`: a throwaway `redis-server` process for integration tests.
//!
//! Each server gets its own free port on 127.0.0.1 and its own working
//! directory, and is killed when dropped. By default it has no persistence
//! (so a restart loses every key, like a failover to an empty replica
//! would); [`RedisServer::start_persistent`] keeps an append-only file
//! across restarts. A machine without `redis-server` makes `start` panic: a
//! Redis test must never pass because it could not run. (`cluster` builds a
//! Redis Cluster out of these.)

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::Signal;

const BINARY: &str = "redis-server";
pub(crate) const NOT_FOUND: &str = "redis-server not found on PATH: install it with \
    `apt-get install -y redis-server` (Debian/Ubuntu) or `brew install redis`; \
    the Redis store tests need a real server (Redis 7 or later for the cluster tests)";
/// How long a fresh server may take to answer PING before the test fails:
/// seconds when a test starts six cluster nodes at once on a busy 2-core
/// machine.
const READY_WITHIN: Duration = Duration::from_secs(20);
/// Fresh ports tried by `start` when another process wins the race for the
/// port between probing it and redis-server binding it.
const PORT_ATTEMPTS: usize = 5;

/// A running (or deliberately stopped) `redis-server` owned by a test.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// The working directory: the log, and whatever Redis writes (the
    /// append-only file, a cluster node's `nodes.conf`). Kept across
    /// restarts, removed on drop.
    dir: PathBuf,
    /// Configuration after the defaults (which they override).
    extra_args: Vec<String>,
}

/// Why one launch attempt failed; only `start` decides whether to retry.
enum LaunchError {
    /// The process exited early, most likely because the port was taken.
    Exited(String),
    /// It kept running but never answered PING.
    NotReady(String),
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    ///
    /// # Panics
    /// If `redis-server` is not on `PATH`, or no server came up.
    pub fn start() -> Self {
        Self::start_with(free_port, &[])
    }

    /// A server with an append-only file fsynced every second
    /// (`appendonly yes`, `appendfsync everysec`), the setting the
    /// operations guide recommends: [`restart`](Self::restart) keeps every
    /// key written more than about a second before the stop.
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub fn start_persistent() -> Self {
        Self::start_with(
            free_port,
            &["--appendonly", "yes", "--appendfsync", "everysec"],
        )
    }

    /// A server that also listens for TLS (on [`tls_port`](Self::tls_port))
    /// with `pki`'s server certificate, not asking clients for one; the
    /// plain port stays, so the harness sees it answer PING.
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub fn start_tls(pki: &crate::tls::TestPki) -> Self {
        let path = |path: &std::path::Path| path.to_string_lossy().into_owned();
        let tls_port = free_port().to_string();
        let (cert, key, ca) = (path(&pki.server.cert), path(&pki.server.key), path(&pki.ca));
        Self::start_with(
            free_port,
            &[
                "--tls-port",
                &tls_port,
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "no",
            ],
        )
    }

    /// The TLS port of a [`start_tls`](Self::start_tls) server.
    pub fn tls_port(&self) -> Option<u16> {
        let at = self.extra_args.iter().position(|arg| arg == "--tls-port")?;
        self.extra_args.get(at + 1)?.parse().ok()
    }

    /// A server on a port from `pick_port` with `extra_args` after the
    /// defaults, retried on fresh ports while the port turns out taken.
    pub(crate) fn start_with(pick_port: impl Fn() -> u16, extra_args: &[&str]) -> Self {
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = pick_port();
            let dir = dir_path(port);
            std::fs::create_dir_all(&dir)
                .unwrap_or_else(|error| panic!("cannot create {}: {error}", dir.display()));
            let mut server = Self {
                port,
                child: None,
                dir,
                extra_args: extra_args.iter().map(|&arg| arg.to_owned()).collect(),
            };
            match server.launch() {
                Ok(()) => return server,
                Err(LaunchError::Exited(why)) => last_error = why,
                Err(LaunchError::NotReady(why)) => panic!("{why}"),
            }
        }
        panic!("redis-server did not start after {PORT_ATTEMPTS} ports: {last_error}");
    }

    /// `redis://127.0.0.1:PORT/`, for `RedisStore::connect`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many connections are subscribed to `channel` (`PUBSUB NUMSUB`,
    /// through redis-cli); 0 while the server does not answer.
    pub fn subscribers(&self, channel: &str) -> usize {
        crate::redis_cluster::cli(self.port, &["PUBSUB", "NUMSUB", channel])
            .and_then(|reply| reply.lines().nth(1)?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Whether every write the server has acknowledged is in its
    /// append-only file (`aof_buffer_length:0` in `INFO persistence`,
    /// through redis-cli), so that killing the process now loses none of
    /// them. Not always so with `appendfsync everysec`: while a background
    /// fsync is still running (a busy disk), Redis postpones writing its
    /// buffer to the file for up to 2 s, having already answered.
    /// `false` while the server does not answer or has no append-only file.
    pub fn aof_written(&self) -> bool {
        crate::redis_cluster::cli(self.port, &["INFO", "persistence"]).is_some_and(|info| {
            info.lines()
                .any(|line| line.trim() == "aof_buffer_length:0")
        })
    }

    /// Kills the server (SIGKILL, no goodbye to clients), as in an outage.
    /// Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Already-exited children make kill fail; wait reaps either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server if it runs, then starts a new one on the same port
    /// and directory: every key is gone, as after a crash without
    /// persistence, unless the server was started with an append-only file
    /// (then it reloads it before answering PING).
    ///
    /// # Panics
    /// If the port cannot be reused or the new server does not answer.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(LaunchError::Exited(why) | LaunchError::NotReady(why)) = self.launch() {
            panic!("redis-server did not restart on port {}: {why}", self.port);
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing is
    /// answered, like a hung host or a partition without RST. Keys survive,
    /// though their expiry clock keeps running. Undo with [`resume`](Self::resume).
    ///
    /// # Panics
    /// If the server is not running or the signal cannot be sent.
    pub fn pause(&self) {
        crate::process::signal(self.pid(), Signal::STOP)
            .unwrap_or_else(|error| panic!("SIGSTOP redis-server: {error}"));
    }

    /// Lets a [`pause`](Self::pause)d server run again (SIGCONT).
    ///
    /// # Panics
    /// If the server is not running or the signal cannot be sent.
    pub fn resume(&self) {
        crate::process::signal(self.pid(), Signal::CONT)
            .unwrap_or_else(|error| panic!("SIGCONT redis-server: {error}"));
    }

    /// The redis-server process id.
    ///
    /// # Panics
    /// If the server is stopped.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .unwrap_or_else(|| panic!("redis-server on port {} is not running", self.port))
    }

    /// Whether the server currently answers PING.
    pub fn is_running(&self) -> bool {
        self.child.is_some() && ping(self.port)
    }

    fn launch(&mut self) -> Result<(), LaunchError> {
        let child = Command::new(BINARY)
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.log())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(error) if error.kind() == ErrorKind::NotFound => panic!("{NOT_FOUND}"),
            Err(error) => panic!("could not run {BINARY}: {error}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                self.child = None;
                return Err(LaunchError::Exited(format!(
                    "redis-server on port {} exited with {status}; log: {}",
                    self.port,
                    self.log_tail()
                )));
            }
            if ping(self.port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(LaunchError::NotReady(format!(
                    "redis-server on port {} did not answer PING within {READY_WITHIN:?}; log: {}",
                    self.port,
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn dir_path(port: u16) -> PathBuf {
    std::env::temp_dir().join(format!("numstream-redis-{}-{port}", std::process::id()))
}

/// One inline PING, answered `+PONG` by a ready server (and `-LOADING` or a
/// refused connection by one that is not).
pub(crate) fn ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let timeout = Duration::from_millis(200);
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    if stream.set_read_timeout(Some(timeout)).is_err() || stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    let mut read = 0;
    while read < reply.len() {
        match stream.read(&mut reply[read..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => read += n,
        }
    }
    &reply == b"+PONG\r\n"
}

/// A port that was free a moment ago, for redis-server (which cannot report
/// a port of its own choosing: `--port 0` turns TCP off). Another process
/// may take it before redis-server binds it; `start` then retries with a
/// new one.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|error| panic!("cannot bind a probe socket on 127.0.0.1: {error}"));
    listener
        .local_addr()
        .unwrap_or_else(|error| panic!("probe socket has no address: {error}"))
        .port()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_stops_and_restarts_on_the_same_port() {
        let mut server = RedisServer::start();
        assert!(server.is_running());
        assert!(server.url().ends_with(&format!(":{}/", server.port())));
        let port = server.port();
        server.stop();
        assert!(!server.is_running());
        assert!(!ping(port), "a stopped server must not answer");
        server.restart();
        assert_eq!(server.port(), port);
        assert!(server.is_running());
    }

    #[test]
    fn counts_the_subscribers_of_a_channel() {
        let server = RedisServer::start();
        assert_eq!(server.subscribers("news"), 0);
        let mut subscriber =
            TcpStream::connect((Ipv4Addr::LOCALHOST, server.port())).expect("connect");
        subscriber
            .write_all(b"*2\r\n$9\r\nSUBSCRIBE\r\n$4\r\nnews\r\n")
            .expect("SUBSCRIBE");
        // The confirmation: once it is read, the subscription is counted.
        let mut confirmation = [0u8; 64];
        let read = subscriber.read(&mut confirmation).expect("confirmation");
        assert!(
            confirmation[..read].starts_with(b"*3\r\n"),
            "{confirmation:?}"
        );
        assert_eq!(server.subscribers("news"), 1);
        assert_eq!(server.subscribers("other"), 0);
    }

    #[test]
    fn two_servers_get_different_ports() {
        let a = RedisServer::start();
        let b = RedisServer::start();
        assert_ne!(a.port(), b.port());
    }
}
