//! The `numstream-server` binary as a user runs it: flags, errors for bad
//! flags, serving a session, and a graceful exit on SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use numstream_protocol::codec::FrameCodec;
use numstream_protocol::{ClientId, ErrorCode, Frame, Open, SequenceChecksum, SessionSeed};

const BIN: &str = env!("CARGO_BIN_EXE_numstream-server");

fn run_to_end(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run numstream-server")
}

#[test]
fn help_documents_every_flag_with_defaults() {
    let output = run_to_end(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--port",
        "--bind",
        "--interval",
        "--session-ttl",
        "--seed",
        "--max-sessions",
        "--max-connections",
        "--per-address-connections",
        "--per-address-handshakes",
        "--per-address-sessions",
        "--per-address-session-rate",
        "--per-address-session-burst",
        "--overload-lag",
        "--overload-store",
        "--overload-queue",
        "--handshake-timeout",
        "--ack-timeout",
        "--shutdown-grace",
        "--store",
        "--store-file",
        "NUMSTREAM_STORE",
        "rediss://",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
        "SIGHUP",
        "--redis-prefix",
        "--metrics-addr",
        "--log-format",
        "--reuse-port",
        "--listen-backlog",
        "--ready-file",
        "[default: 4096]",
        "--generate",
        "[default: $NUMSTREAM_STORE, else memory]",
        "[default: numstream:]",
        "[default: 1s]",
        "[default: 30s]",
        "[default: text]",
        "[default: off]",
        "Examples:",
    ] {
        assert!(help.contains(flag), "--help must mention {flag}:\n{help}");
    }
    // Every flag has an example, and every value-taking flag its default.
    let flags: Vec<&str> = help
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("--"))
        .filter_map(|rest| rest.split([' ', '=']).next())
        .filter(|flag| !["help", "version"].contains(flag))
        .collect();
    assert!(flags.len() >= 15, "{flags:?}");
    for flag in &flags {
        assert!(
            help.contains(&format!("Example: --{flag}")),
            "--{flag} has no example:\n{help}"
        );
    }
    let short = String::from_utf8_lossy(&run_to_end(&["-h"]).stdout).into_owned();
    for line in short
        .lines()
        .filter(|line| line.trim_start().starts_with("--"))
    {
        let takes_value = line.contains('<');
        let required_or_special = ["--port", "--generate"]
            .iter()
            .any(|flag| line.trim_start().starts_with(flag));
        if takes_value && !required_or_special {
            assert!(line.contains("[default: "), "no default shown: {line}");
        }
    }
}

#[test]
fn generates_a_man_page_and_completions_without_other_flags() {
    let man = run_to_end(&["--generate", "man"]);
    assert!(man.status.success(), "{man:?}");
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(man.contains(".TH numstream-server"), "{man}");
    assert!(man.contains("metrics\\-addr"), "{man}");
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = run_to_end(&["--generate", shell]);
        assert!(script.status.success(), "{shell}: {script:?}");
        assert!(
            String::from_utf8_lossy(&script.stdout).contains("session-ttl"),
            "{shell}"
        );
    }
}

#[test]
fn bad_flags_exit_2_and_say_what_is_accepted() {
    let cases: [(&[&str], &str); 18] = [
        (
            &["--port", "7000", "--listen-backlog", "0"],
            "--listen-backlog",
        ),
        (&[], "--port"),
        (&["--port", "65536"], "--port"),
        (
            &["--port", "7000", "--interval", "soon"],
            "such as 5s, 500ms or 2m",
        ),
        (&["--port", "7000", "--interval", "2h"], "between 0s and 1h"),
        (
            &["--port", "7000", "--session-ttl", "0s"],
            "between 100ms and 49 days",
        ),
        (
            &["--port", "7000", "--store", "postgres://db"],
            "--store: expected `memory`, `redis://",
        ),
        (
            &["--port", "7000", "--store-file", "/nonexistent/store"],
            "--store-file /nonexistent/store: No such file",
        ),
        (
            &["--port", "7000", "--store", "memory", "--store-file", "/x"],
            "cannot be used with",
        ),
        (&["--port", "7000", "--tls-cert", "/x.pem"], "--tls-key"),
        (&["--port", "7000", "--tls-key", "/x.key"], "--tls-cert"),
        (
            &["--port", "7000", "--tls-client-ca", "/ca.pem"],
            "--tls-cert",
        ),
        (
            &[
                "--port",
                "7000",
                "--tls-cert",
                "/nonexistent/c.pem",
                "--tls-key",
                "/k",
            ],
            "cannot set up TLS (--tls-cert, --tls-key, --tls-client-ca): cannot read /nonexistent/c.pem",
        ),
        (
            &[
                "--port",
                "7000",
                "--store",
                "redis-cluster://127.0.0.1:7000/2",
            ],
            "a cluster has no database number",
        ),
        (
            &["--port", "7000", "--store", "redis://127.0.0.1:notaport/0"],
            "does not parse",
        ),
        (
            &["--port", "7000", "--log-format", "xml"],
            "[possible values: text, json]",
        ),
        (
            &["--port", "7000", "--metrics-addr", "localhost"],
            "expected an IP address and port, e.g. 127.0.0.1:9100",
        ),
        (&["--port", "7000", "--generate", "tcsh"], "man, bash, zsh"),
    ];
    for (args, expected) in cases {
        let output = run_to_end(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// Every flag that takes a value, values of every kind past its range,
/// and the range its error must name.
const OUT_OF_RANGE: &[(&str, &[&str], &str)] = &[
    (
        "--port",
        &["65536", "-1", "99999999999999999999", "x"],
        "between 0 and 65535",
    ),
    (
        "--interval",
        &["2h", "-1s", "99999999999999999999999s", "5"],
        "between 0s and 1h",
    ),
    (
        "--session-ttl",
        &["0s", "99ms", "50days", "99999999999999999999999s"],
        "between 100ms and 49 days",
    ),
    (
        "--seed",
        &["-1", "18446744073709551616", "seed"],
        "between 0 and 18446744073709551615",
    ),
    (
        "--max-sessions",
        &["0", "-1", "1000000001", "18446744073709551615"],
        "between 1 and 1000000000",
    ),
    (
        "--max-connections",
        &["0", "-5", "10000001", "18446744073709551615"],
        "between 1 and 10000000",
    ),
    (
        "--per-address-connections",
        &["-1", "10000001", "4294967296"],
        "between 0 and 10000000",
    ),
    (
        "--per-address-handshakes",
        &["-1", "10000001", "99999999999999999999"],
        "between 0 and 10000000",
    ),
    (
        "--per-address-sessions",
        &["-1", "1000000001", "4294967296"],
        "between 0 and 1000000000",
    ),
    (
        "--per-address-session-rate",
        &["-1", "1000001", "4294967296"],
        "between 0 and 1000000",
    ),
    (
        "--per-address-session-burst",
        &["0", "-1", "1000001"],
        "between 1 and 1000000",
    ),
    (
        "--overload-lag",
        &["2h", "-1s", "99999999999999999999999s"],
        "between 0s and 1h",
    ),
    (
        "--overload-store",
        &["2h", "-1ms", "soon"],
        "between 0s and 1h",
    ),
    (
        "--overload-queue",
        &["-1", "10000001", "many", "1e3"],
        "between 0 and 10000000",
    ),
    (
        "--handshake-timeout",
        &["0s", "2h", "99999999999999999999999s"],
        "between 1ms and 1h",
    ),
    (
        "--ack-timeout",
        &["0s", "25h", "99999999999999999999999s"],
        "between 1ms and 24h",
    ),
    (
        "--shutdown-grace",
        &["2h", "-1s", "99999999999999999999999s"],
        "between 0s and 1h",
    ),
    (
        "--listen-backlog",
        &["0", "65536", "-1", "99999999999999999999"],
        "between 1 and 65535",
    ),
];

#[test]
fn no_flag_value_panics_and_out_of_range_values_name_the_range() {
    for (flag, values, range) in OUT_OF_RANGE {
        for value in *values {
            let mut args = vec![*flag, *value];
            if *flag != "--port" {
                args.extend(["--port", "7000"]);
            }
            let output = run_to_end(&args);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{flag} {value}: {stderr}");
            assert!(
                stderr.contains(range),
                "{flag} {value} must name {range:?}: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{flag} {value}: {stderr}");
        }
    }
    // A long --redis-prefix, and strings where numbers go, for good measure.
    let long_prefix = "p".repeat(257);
    let output = run_to_end(&["--port", "7000", "--redis-prefix", &long_prefix]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("at most 256 bytes"));
}

/// The other side of the ranges: every limit at its largest accepted value
/// at once starts a server that serves.
#[tokio::test]
async fn the_largest_accepted_values_start_a_working_server() {
    let max_ttl = format!("{}ms", u32::MAX);
    let args = [
        "--interval",
        "1h",
        "--session-ttl",
        &max_ttl,
        "--seed",
        "18446744073709551615",
        "--max-sessions",
        "1000000000",
        "--max-connections",
        "10000000",
        "--per-address-connections",
        "10000000",
        "--per-address-handshakes",
        "10000000",
        "--per-address-sessions",
        "1000000000",
        "--per-address-session-rate",
        "1000000",
        "--per-address-session-burst",
        "1000000",
        "--overload-lag",
        "1h",
        "--overload-store",
        "1h",
        "--overload-queue",
        "10000000",
        "--handshake-timeout",
        "1h",
        "--ack-timeout",
        "24h",
        "--shutdown-grace",
        "1h",
        "--listen-backlog",
        "65535",
    ];
    let (mut server, port, log) = start_and_wait_until_listening(0, &args).await;
    // One number is due at once, whatever the interval.
    complete_session(port, u64::MAX, 1).await;
    server.start_kill().expect("stop the server");
    let status = server.wait().await.expect("server exit");
    assert_ne!(status.code(), Some(101), "panicked: {:#?}", log_lines(&log));
    assert!(!log_lines(&log).iter().any(|line| line.contains("panicked")));
}

#[test]
fn port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let output = run_to_end(&["--port", &port]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot listen on"), "{stderr}");
}

/// A connection to the server on `port`, which has reported that it
/// listens (so the connection is queued, not refused).
async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|error| panic!("connect to the server on port {port}: {error}"))
}

/// Runs one whole session of `count` numbers against the server on `port`
/// (started with `--seed seed`) and checks every number and the checksum.
async fn complete_session(port: u16, seed: u64, count: u16) {
    let id = ClientId::new_v4();
    let mut framed = Framed::new(connect(port).await, FrameCodec);
    framed
        .send(Frame::Open(Open {
            client_id: id,
            count,
        }))
        .await
        .expect("send OPEN");
    let mut received = SequenceChecksum::new();
    let mut server_checksum = None;
    while let Some(frame) = framed.next().await {
        match frame.expect("valid frame") {
            Frame::Welcome(_) => {}
            Frame::Number { value, .. } => received.push(value),
            Frame::Final {
                value, checksum, ..
            } => {
                received.push(value);
                server_checksum = Some(checksum);
                framed
                    .send(Frame::Ack {
                        client_checksum: received.checksum(),
                    })
                    .await
                    .expect("send ACK");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let expected = SequenceChecksum::of_session(&SessionSeed::derive(seed, id), count);
    assert_eq!(received, expected);
    assert_eq!(server_checksum, Some(expected.checksum()));
}

/// The log a server has written so far, line by line; read in the
/// background so the server never blocks on a full pipe.
type Log = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

fn log_lines(log: &Log) -> Vec<String> {
    log.lock().map(|lines| lines.clone()).unwrap_or_default()
}

/// Starts the server on `port` (0: the kernel's choice) with `args` and
/// waits (bounded) until it reports the port it listens on (stdout) and has
/// logged its "starting" line (with its limits).
async fn start_and_wait_until_listening(
    port: u16,
    args: &[&str],
) -> (tokio::process::Child, u16, Log) {
    let mut command = tokio::process::Command::new(BIN);
    command.args(["--port", &port.to_string()]).args(args);
    spawn_and_wait_until_listening(command).await
}

/// [`spawn_and_wait_until_listening`] with `--port 0` added.
async fn spawn_with_port_zero(
    mut command: tokio::process::Command,
) -> (tokio::process::Child, u16, Log) {
    command.args(["--port", "0"]);
    spawn_and_wait_until_listening(command).await
}

async fn spawn_and_wait_until_listening(
    mut command: tokio::process::Command,
) -> (tokio::process::Child, u16, Log) {
    use tokio::io::AsyncBufReadExt;
    let mut server = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn server");
    let stdout = server.stdout.take().expect("piped stdout");
    let stderr = server.stderr.take().expect("piped stderr");
    let log = Log::default();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let collected = log.clone();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut started = Some(started_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            let starting = line.contains("numstream-server starting");
            if let Ok(mut log) = collected.lock() {
                log.push(line);
            }
            if starting && let Some(started) = started.take() {
                let _ = started.send(());
            }
        }
    });
    let announced = tokio::time::timeout(Duration::from_secs(10), async {
        let line = tokio::io::BufReader::new(stdout).lines().next_line().await;
        let started = started_rx.await;
        (line, started)
    })
    .await;
    let Ok((Ok(Some(line)), Ok(()))) = announced else {
        panic!("server did not start: {announced:?} {:#?}", log_lines(&log));
    };
    let port = line
        .strip_prefix("listening on ")
        .and_then(|address| address.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("not `listening on ADDR:PORT`: {line:?}"))
        .port();
    (server, port, log)
}

#[tokio::test]
async fn reuse_port_lets_a_second_server_share_the_port() {
    let args = ["--reuse-port", "--seed", "11", "--interval", "1ms"];
    let (mut first, port, _) = start_and_wait_until_listening(0, &args).await;
    let (_second, shared, second_log) = start_and_wait_until_listening(port, &args).await;
    assert_eq!(shared, port);
    assert!(
        log_lines(&second_log)
            .iter()
            .any(|line| line.contains("--reuse-port with the in-memory store")),
        "sharing a port without a shared store must warn: {second_log:#?}"
    );

    // Without the flag the port is still refused, with a hint.
    let output = run_to_end(&["--port", &port.to_string()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--reuse-port"), "{stderr}");

    // With the first one gone, the port is served by the second alone.
    first.kill().await.expect("kill the first server");
    complete_session(port, 11, 4).await;
}

#[tokio::test]
async fn at_its_descriptor_limit_the_server_refuses_politely() {
    // 400 descriptors: the default connection limit leaves room for the
    // listener, the store, 256 busy rejections and the status endpoint.
    let mut command = tokio::process::Command::new("sh");
    command.args([
        "-c",
        "ulimit -n 400 && exec \"$0\" \"$@\"",
        BIN,
        "--port",
        "0",
        // The global limit is under test: every client here comes from one
        // address, which the per-address quotas would stop first.
        "--per-address-connections",
        "0",
        "--per-address-handshakes",
        "0",
    ]);
    let (_server, port, log) = spawn_and_wait_until_listening(command).await;
    assert!(
        log_lines(&log)
            .iter()
            .any(|line| line.contains("max_connections=16")),
        "{:#?}",
        log_lines(&log)
    );

    // Far more clients than that, all at once, each holding on.
    let mut clients = Vec::new();
    for _ in 0..400 {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut framed = Framed::new(stream, FrameCodec);
        // A rejected connection may already be closed: ignore send errors.
        let _ = framed
            .send(Frame::Open(Open {
                client_id: ClientId::new_v4(),
                count: 1000,
            }))
            .await;
        clients.push(framed);
    }
    let (mut welcomed, mut busy, mut closed) = (0, 0, 0);
    for framed in &mut clients {
        match tokio::time::timeout(Duration::from_secs(10), framed.next()).await {
            Ok(Some(Ok(Frame::Welcome(_)))) => welcomed += 1,
            Ok(Some(Ok(Frame::Error(error)))) if error.code == ErrorCode::ServerBusy => busy += 1,
            // Past the rejections in flight, excess connections are closed.
            Ok(None | Some(Err(_))) => closed += 1,
            Ok(Some(Ok(other))) => panic!("unexpected {other:?}"),
            Err(_) => panic!("a connection got no answer within 10 s"),
        }
    }
    assert_eq!(welcomed, 16, "busy {busy}, closed {closed}");
    assert!(busy > 0, "welcomed {welcomed}, closed {closed}");
    let log = log_lines(&log);
    assert!(
        !log.iter().any(|line| line.contains("accept failed")),
        "the server ran out of descriptors: {log:#?}"
    );
}

#[tokio::test]
async fn serves_a_reproducible_session_and_drains_on_sigterm() {
    let ready_file =
        std::env::temp_dir().join(format!("numstream-cli-test-{}.ready", std::process::id()));
    let _ = std::fs::remove_file(&ready_file);
    let mut command = tokio::process::Command::new(BIN);
    command.args(["--interval", "5ms", "--seed", "7", "--ready-file"]);
    command.arg(&ready_file);
    let (mut server, port, _log) = spawn_with_port_zero(command).await;
    // The ready file says what stdout said.
    let ready = std::fs::read_to_string(&ready_file).expect("the ready file exists once listening");
    let _ = std::fs::remove_file(&ready_file);
    assert_eq!(ready, format!("address=127.0.0.1:{port}\n"));

    // A complete session whose numbers follow from --seed and the client id.
    complete_session(port, 7, 5).await;

    // A streaming client is told about the shutdown; the process exits 0.
    let mut streaming = Framed::new(connect(port).await, FrameCodec);
    streaming
        .send(Frame::Open(Open {
            client_id: ClientId::new_v4(),
            count: 60_000,
        }))
        .await
        .expect("send OPEN");
    assert!(matches!(
        streaming.next().await,
        Some(Ok(Frame::Welcome(_)))
    ));
    let pid = server.id().expect("server pid");
    numstream_harness::process::signal(pid, numstream_harness::process::Signal::TERM)
        .expect("SIGTERM the server");
    let mut told = false;
    while let Some(frame) = streaming.next().await {
        if let Ok(Frame::Error(error)) = frame {
            assert_eq!(error.code, ErrorCode::ShuttingDown);
            told = true;
        }
    }
    assert!(
        told,
        "a streaming client must be told the server is shutting down"
    );
    let status = tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("server must exit within its grace period")
        .expect("wait for server");
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
}
