//! The `numstream-client` binary as a user runs it: flags, stdout, exit
//! codes.

use std::process::{Command, Output};

use numstream_harness::fake_server::*;
use numstream_protocol::Frame;

fn client(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_numstream-client"));
    command.args(args).env_remove("RUST_LOG");
    command
}

fn output(args: &[&str]) -> Output {
    client(args).output().expect("run numstream-client")
}

async fn output_async(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        output(&args)
    })
    .await
    .expect("client process")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn count_out_of_range_is_a_usage_error() {
    let out = output(&["--port", "7000", "--count", "70000"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("must be between 1 and 65535"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());
    let zero = output(&["--port", "7000", "--count", "0"]);
    assert_eq!(zero.status.code(), Some(2));
    assert!(stderr(&zero).contains("must be between 1 and 65535"));
}

#[test]
fn bad_client_id_is_a_usage_error() {
    let out = output(&["--port", "7000", "--client-id", "not-a-uuid"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("must be a UUID"), "{}", stderr(&out));
}

#[test]
fn port_is_required() {
    let out = output(&["--count", "5"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--port"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_mode_prints_exactly_one_object() {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut conn = accept(&listener).await;
        let Frame::Open(open) = recv(&mut conn).await else {
            panic!("expected OPEN");
        };
        send(&mut conn, welcome(open.count, 0)).await;
        finish(&mut conn, open.count, 0).await
    });
    let id = "5f0c5e1a-8d3c-4c2e-9b1a-2f3e4d5c6b7a";
    let args = [
        "--port",
        &port.to_string(),
        "--count",
        "7",
        "--client-id",
        id,
        "--json",
    ]
    .map(str::to_owned)
    .to_vec();
    let out = output_async(args).await;
    join(server).await;

    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 stdout");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    assert_eq!(value["client_id"], id);
    assert_eq!(value["count"], 7);
    assert_eq!(value["received"], 7);
    assert_eq!(value["sum"], expected(7).sum());
    let checksum = format!("0x{:08x}", expected(7).checksum());
    assert_eq!(value["server_checksum"], checksum.as_str());
    assert_eq!(value["client_checksum"], checksum.as_str());
    assert_eq!(value["reconnects"], 0);
    assert_eq!(value["ok"], true);
    assert!(value["error"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn human_mode_reports_a_protocol_violation_with_exit_code_5() {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut conn = accept(&listener).await;
        recv(&mut conn).await;
        send(&mut conn, welcome(3, 0)).await;
        send(&mut conn, number(3, 1)).await;
        closed_by_client(&mut conn).await;
    });
    let args = ["--port", &port.to_string(), "--count", "3", "--quiet"]
        .map(str::to_owned)
        .to_vec();
    let out = output_async(args).await;
    join(server).await;

    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 stdout");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 8, "{stdout}");
    assert_eq!(lines[1], "count            3");
    assert_eq!(lines[2], "received         0");
    assert!(
        lines[7].starts_with("result           FAILED: protocol violation by the server"),
        "{stdout}"
    );
}

/// Runs the client, killing it if it is still running after `limit`: a
/// value that should have been refused but was accepted must fail the
/// test, not hang it.
fn output_within(args: &[&std::ffi::OsStr], limit: std::time::Duration) -> Output {
    numstream_harness::process::output_within(
        Command::new(env!("CARGO_BIN_EXE_numstream-client"))
            .args(args)
            .env_remove("RUST_LOG"),
        limit,
    )
}

#[test]
fn every_flag_refuses_extreme_values_with_a_usage_error_naming_the_range() {
    const U64_MAX: &str = "18446744073709551615";
    let long_host = "a".repeat(300);
    let ranges: [(&str, &str, Vec<&str>); 8] = [
        (
            "--port",
            "must be between 1 and 65535",
            vec![
                "0",
                "65536",
                U64_MAX,
                "-1",
                "",
                " ",
                "abc",
                "7e3",
                "99999999999999999999999",
            ],
        ),
        (
            "--count",
            "must be between 1 and 65535",
            vec!["0", "65536", U64_MAX, "-1", "", "abc", "1.5", "-0"],
        ),
        (
            "--host",
            "host must be an IP address or a host name of 1 to 253",
            vec![
                "",
                " ",
                "a b",
                "10.0.0.5:7000",
                "-1",
                &long_host,
                "\u{7f}",
                "ünï",
            ],
        ),
        (
            "--client-id",
            "client id must",
            vec![
                "",
                "nope",
                "-1",
                U64_MAX,
                "00000000-0000-0000-0000-000000000000",
                "ffffffff-ffff-ffff-ffff-ffffffffffff",
            ],
        ),
        (
            "--open-timeout",
            "must be a duration between 1s and 24h",
            vec![
                "0s",
                "0",
                "999ms",
                "25h",
                "-1s",
                "1000000000000000s",
                "18446744073709551615s",
                "99999999999999999999999999h",
                U64_MAX,
                "",
                "soon",
            ],
        ),
        (
            "--generate",
            "[possible values: man, bash",
            vec!["", "tcsh", "-1", U64_MAX],
        ),
        (
            "--max-duration",
            "must be a duration between 1s and 100000h",
            vec![
                "0s",
                "999ms",
                "100001h",
                "-1s",
                "18446744073709551615s",
                U64_MAX,
                "",
                "forever",
            ],
        ),
        (
            // Checked with --tls (added below): a name no certificate can
            // carry is refused before any connection.
            "--tls-server-name",
            "is not a valid TLS server name",
            vec!["", " ", "a b", "-1", "\u{7f}"],
        ),
    ];
    // Flags that take no value: a value is refused (there is no range to
    // name, but it must still be a usage error, not a crash).
    let switches = [
        ("--json=yes", "unexpected value"),
        ("--quiet=1", "unexpected value"),
        ("--verbose=", "unexpected value"),
        ("--tls=1", "unexpected value"),
        ("--no-such-flag", "unexpected argument"),
    ];

    // A run that wrongly started must end quickly: nothing listens on
    // this port, and the open timeout is short unless it is under test.
    let port = numstream_harness::raw::closed_port().to_string();
    let limit = std::time::Duration::from_secs(30);
    let mut cases: Vec<(Vec<String>, &str)> = Vec::new();
    for (flag, expected, values) in &ranges {
        for value in values {
            let mut args = vec![(*flag).to_owned(), (*value).to_owned()];
            if *flag != "--port" {
                args.extend(["--port".to_owned(), port.clone()]);
            }
            if *flag != "--open-timeout" {
                args.extend(["--open-timeout".to_owned(), "1s".to_owned()]);
            }
            if flag.starts_with("--tls") {
                args.push("--tls".to_owned());
            }
            cases.push((args, expected));
        }
    }
    // The TLS files: read before any connection, so a missing or unusable
    // one is a usage error naming it; and the flags that need --tls or
    // each other.
    let not_pem = std::env::temp_dir().join(format!("numstream-not-pem-{}", std::process::id()));
    std::fs::write(&not_pem, "not a certificate").expect("write a temp file");
    let not_pem = not_pem.to_str().expect("utf-8 temp path").to_owned();
    for (flags, expected) in [
        (
            vec!["--tls", "--tls-ca", "/nonexistent/ca.pem"],
            "cannot read /nonexistent/ca.pem",
        ),
        (
            vec!["--tls", "--tls-ca", &not_pem],
            "holds no PEM certificate",
        ),
        (
            vec![
                "--tls",
                "--tls-client-cert",
                &not_pem,
                "--tls-client-key",
                &not_pem,
            ],
            "holds no PEM certificate",
        ),
        (vec!["--tls-ca", &not_pem], "--tls"),
        (vec!["--tls-server-name", "localhost"], "--tls"),
        (
            vec!["--tls", "--tls-client-cert", &not_pem],
            "--tls-client-key",
        ),
        (
            vec!["--tls", "--tls-client-key", &not_pem],
            "--tls-client-cert",
        ),
    ] {
        let mut args: Vec<String> = flags.iter().map(|flag| (*flag).to_owned()).collect();
        args.extend([
            "--port".to_owned(),
            port.clone(),
            "--open-timeout".to_owned(),
            "1s".to_owned(),
        ]);
        cases.push((args, expected));
    }
    for (switch, expected) in switches {
        let args = [switch, "--port", &port, "--open-timeout", "1s"];
        cases.push((args.map(str::to_owned).to_vec(), expected));
    }
    for (args, expected) in cases {
        let os_args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        let out = output_within(&os_args, limit);
        assert_usage_error(&out, &args, expected);
    }

    // Bytes that are not UTF-8 at all.
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let garbage = std::ffi::OsStr::from_bytes(&[0xff, 0xfe]);
        for flag in [
            "--host",
            "--port",
            "--count",
            "--client-id",
            "--open-timeout",
            "--max-duration",
        ] {
            let out = output_within(&[std::ffi::OsStr::new(flag), garbage], limit);
            assert_usage_error(&out, &[flag.to_owned()], "invalid UTF-8");
        }
    }
}

fn assert_usage_error(out: &Output, args: &[String], expected: &str) {
    let stderr = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}: nothing runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_busy_past_the_open_timeout_exits_4_after_logging_each_retry() {
    let (listener, port) = listen().await;
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&refused);
    let server = tokio::spawn(async move {
        loop {
            let mut conn = accept(&listener).await;
            recv(&mut conn).await;
            let busy = numstream_protocol::ErrorFrame::new(
                numstream_protocol::ErrorCode::ServerBusy,
                "at the session cap",
            );
            // Counted before the reply, so the count is complete by the
            // time the client has read it.
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            send(&mut conn, Frame::Error(busy)).await;
        }
    });
    let args = [
        "--port",
        &port.to_string(),
        "--count",
        "3",
        "--open-timeout",
        "2s",
        "--json",
        "--verbose",
    ]
    .map(str::to_owned)
    .to_vec();
    let started = std::time::Instant::now();
    let out = output_async(args).await;
    let ran_for = started.elapsed();
    server.abort();

    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    // Attempts go on into the last tenth of the 2 s timeout.
    assert!(
        ran_for >= std::time::Duration::from_millis(1800),
        "gave up after {ran_for:?}"
    );
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(value["ok"], false);
    let error = value["error"].as_str().expect("error text");
    assert!(error.contains("server_busy"), "{error}");
    let attempts: usize = error
        .strip_prefix("cannot connect: no WELCOME after ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no attempt count in {error}"));
    assert!(attempts >= 2, "a busy server is retried: {error}");
    let refused = refused.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(refused, attempts, "every attempt met server_busy");
    // --verbose logs every retry: one line per attempt but the last.
    let stderr = stderr(&out);
    let retries = stderr
        .lines()
        .filter(|l| l.contains("reconnecting"))
        .count();
    assert_eq!(retries + 1, attempts, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A hostile server's ERROR message holds a newline, a forged `result OK`
/// row and terminal escapes: the summary (stdout) and the log lines
/// (stderr, with --verbose) show them escaped, on the lines they belong
/// to, and nothing reaches the terminal raw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_servers_message_cannot_forge_the_summary_or_reach_the_terminal() {
    use numstream_protocol::{Disposition, ErrorCode, ErrorFrame};
    const FORGED: &str =
        "bye\nresult           OK\n\u{1b}]0;owned\u{7}\u{1b}[1A\u{1b}[2K\r\u{85}\u{202e}";
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        // First a retryable refusal (logged with --verbose), then a final one.
        for disposition in [Disposition::Retry, Disposition::Final] {
            let mut conn = accept(&listener).await;
            recv(&mut conn).await;
            let error =
                ErrorFrame::new(ErrorCode::SessionUnknown, FORGED).with_disposition(disposition);
            send(&mut conn, Frame::Error(error)).await;
            closed_by_client(&mut conn).await;
        }
    });
    let args = ["--port", &port.to_string(), "--count", "3", "--verbose"]
        .map(str::to_owned)
        .to_vec();
    let out = output_async(args).await;
    join(server).await;

    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout.clone()).expect("UTF-8 stdout");
    let stderr = stderr(&out);
    // The summary's own result line only; none in the logs.
    for (stream, text, result_lines) in [("stdout", &stdout, 1), ("stderr", &stderr, 0)] {
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "a raw control character on {stream}: {text:?}"
        );
        assert!(!text.contains('\u{202e}'), "{stream}: {text:?}");
        let results = text
            .lines()
            .filter(|line| line.trim_start().starts_with("result"))
            .count();
        assert_eq!(results, result_lines, "{stream} has a forged line: {text}");
    }
    assert!(stderr.contains("reconnecting"), "{stderr}");
    assert!(stderr.contains("bye\\nresult"), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 8, "{stdout}");
    assert!(lines[7].starts_with("result           FAILED:"), "{stdout}");
    assert!(
        lines[7].contains("bye\\nresult           OK\\n\\x1b]0;owned\\x07"),
        "{stdout}"
    );
}

/// A server that announces a TTL of 49.7 days and then drops the session
/// cannot hold the client past --max-duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_duration_ends_a_run_whatever_the_server_announced() {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut conn = accept(&listener).await;
        recv(&mut conn).await;
        send(&mut conn, welcome_with(5, 0, 0, u32::MAX)).await;
        send(&mut conn, number(5, 0)).await;
        // Dropping the listener too: every resume is refused from now on.
    });
    let args = [
        "--port".to_owned(),
        port.to_string(),
        "--count".to_owned(),
        "5".to_owned(),
        "--max-duration".to_owned(),
        "2s".to_owned(),
        "--quiet".to_owned(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        let os_args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        output_within(&os_args, std::time::Duration::from_secs(60))
    })
    .await
    .expect("client process");
    join(server).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 stdout");
    assert!(stdout.contains("received         1"), "{stdout}");
    assert!(
        stdout.contains("FAILED: gave up: the run took longer than its maximum duration of 2s"),
        "{stdout}"
    );
}
