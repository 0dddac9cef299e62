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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

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
        "--handshake-timeout",
        "--ack-timeout",
        "--shutdown-grace",
        "--store",
        "--redis-prefix",
        "--metrics-addr",
        "--log-format",
        "--generate",
        "[default: memory]",
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
    let cases: [(&[&str], &str); 10] = [
        (&[], "--port"),
        (&["--port", "0"], "--port"),
        (
            &["--port", "7000", "--interval", "soon"],
            "examples: 1s, 50ms, 0s",
        ),
        (&["--port", "7000", "--interval", "2h"], "at most 1h"),
        (
            &["--port", "7000", "--session-ttl", "0s"],
            "greater than zero",
        ),
        (
            &["--port", "7000", "--store", "postgres://db"],
            "expected `memory` or `redis://HOST:PORT/DB`",
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

#[test]
fn port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let output = run_to_end(&["--port", &port]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot listen on"), "{stderr}");
}

async fn connect_when_up(port: u16) -> TcpStream {
    for _ in 0..100 {
        if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await {
            return stream;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not start listening on port {port}");
}

#[tokio::test]
async fn serves_a_reproducible_session_and_drains_on_sigterm() {
    let port = free_port();
    let mut server = tokio::process::Command::new(BIN)
        .args([
            "--port",
            &port.to_string(),
            "--interval",
            "5ms",
            "--seed",
            "7",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn server");

    // A complete session whose numbers follow from --seed and the client id.
    let id = ClientId::new_v4();
    let mut framed = Framed::new(connect_when_up(port).await, FrameCodec);
    framed
        .send(Frame::Open(Open {
            client_id: id,
            count: 5,
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
    let expected = SequenceChecksum::of_session(&SessionSeed::derive(7, id), 5);
    assert_eq!(received, expected);
    assert_eq!(server_checksum, Some(expected.checksum()));

    // A streaming client is told about the shutdown; the process exits 0.
    let mut streaming = Framed::new(connect_when_up(port).await, FrameCodec);
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
    let pid = server.id().expect("server pid").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(killed.success());
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
