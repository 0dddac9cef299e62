//! The `numstream-client` binary as scripts and people use it: `--json`
//! output that matches `docs/client-report.schema.json` for every outcome,
//! `--verbose` reconnect lines, a quiet stderr when it is not a terminal,
//! and `--generate` for man pages and completions.

use std::process::{Command, Output};

use numstream_harness::fake_server::*;
use numstream_protocol::{ErrorCode, ErrorFrame, Frame};
use serde_json::Value;

const SCHEMA: &str = include_str!("../../../docs/client-report.schema.json");

fn client(args: &[String]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_numstream-client"));
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR");
    command
}

/// Runs the client with piped stdout and stderr (neither is a terminal).
async fn output(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
    tokio::task::spawn_blocking(move || client(&args).output().expect("run numstream-client"))
        .await
        .expect("client process")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("UTF-8 output")
}

/// The one JSON object on stdout, after checking it against the schema and
/// that `ok` agrees with the exit status.
fn report(out: &Output) -> Value {
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "one line: {stdout}");
    let value: Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    let schema: Value = serde_json::from_str(SCHEMA).expect("the schema is JSON");
    let validator = jsonschema::draft202012::new(&schema).expect("a valid 2020-12 schema");
    let problems: Vec<String> = validator
        .iter_errors(&value)
        .map(|error| format!("{}: {error}", error.instance_path()))
        .collect();
    assert!(
        problems.is_empty(),
        "{stdout} breaks the schema: {problems:#?}"
    );
    assert_eq!(value["ok"], out.status.code() == Some(0), "{stdout}");
    value
}

/// A fake server that drops the first connection of a `count`-number
/// session after `numbers` numbers, then serves the resume to the end.
async fn dropping_once_after(numbers: u16, count: u16) -> FakeServer {
    let session = session(count);
    FakeServer::start(vec![
        Script::new()
            .expect(Expect::Open)
            .send(session.welcome(0))
            .send_numbers(&session, 0..numbers)
            .cut(),
        Script::new()
            .expect(Expect::Resume {
                next_index: numbers,
            })
            .send(session.welcome(numbers))
            .send_numbers(&session, numbers..count)
            .expect(Expect::Ack),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_reports_match_the_schema_for_success_rejection_and_violation() {
    // Success, after a dropped connection and a resume.
    let server = dropping_once_after(3, 9).await;
    let port = server.port().to_string();
    let ok = output(&["--port", &port, "--count", "9", "--json"]).await;
    server.finish().await;
    let value = report(&ok);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
    assert_eq!(value["reconnects"], 1);
    assert_eq!(value["received"], 9);
    assert!(value["error"].is_null());

    // A final refusal: exit 3, no FINAL, the server's words in `error`.
    let refusal = ErrorFrame::new(ErrorCode::SessionExists, "already open elsewhere");
    let server = FakeServer::start(vec![
        Script::new()
            .expect(Expect::Open)
            .send(Frame::Error(refusal))
            .expect_closed(),
    ])
    .await;
    let port = server.port().to_string();
    let refused = output(&["--port", &port, "--count", "65535", "--json"]).await;
    server.finish().await;
    let value = report(&refused);
    assert_eq!(refused.status.code(), Some(3));
    assert!(value["server_checksum"].is_null());
    assert_eq!(value["client_checksum"], "0x00000000");
    let error = value["error"].as_str().expect("error text");
    assert!(error.contains("already open elsewhere"), "{error}");

    // A protocol violation part-way: exit 5, what arrived is reported.
    let server = FakeServer::start(vec![
        Script::new()
            .expect(Expect::Open)
            .send(welcome(1, 0))
            .send(Frame::Number { index: 0, value: 7 })
            .expect_closed(),
    ])
    .await;
    let port = server.port().to_string();
    let broken = output(&["--port", &port, "--count", "1", "--json"]).await;
    server.finish().await;
    let value = report(&broken);
    assert_eq!(broken.status.code(), Some(5));
    assert_eq!(value["count"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verbose_logs_each_reconnect_with_cause_and_delay_and_no_bar_off_a_terminal() {
    let server = dropping_once_after(2, 5).await;
    let port = server.port().to_string();
    let verbose = output(&["--port", &port, "--count", "5", "--verbose"]).await;
    server.finish().await;
    assert_eq!(verbose.status.code(), Some(0));
    let stderr = text(&verbose.stderr);
    let line = stderr
        .lines()
        .find(|line| line.contains("reconnecting"))
        .unwrap_or_else(|| panic!("no reconnect line: {stderr}"));
    for part in ["cause=", "closed the connection", "delay=", "attempt=1"] {
        assert!(line.contains(part), "{part:?} missing from {line}");
    }
    assert!(
        !stderr.contains('\u{1b}'),
        "no ANSI off a terminal: {stderr:?}"
    );
    assert!(
        !stderr.contains('\r'),
        "no progress bar off a terminal: {stderr:?}"
    );

    // Without --verbose (and without --quiet) a run that goes well prints
    // nothing at all on a non-terminal stderr.
    let server = FakeServer::start(vec![
        Script::new()
            .expect(Expect::Open)
            .send(welcome(3, 0))
            .send_numbers(&session(3), 0..3)
            .expect(Expect::Ack),
    ])
    .await;
    let port = server.port().to_string();
    let plain = output(&["--port", &port, "--count", "3"]).await;
    server.finish().await;
    assert_eq!(plain.status.code(), Some(0));
    assert_eq!(text(&plain.stderr), "");
    assert!(text(&plain.stdout).ends_with("result           OK\n"));
}

#[tokio::test]
async fn generates_a_man_page_and_completions_without_other_flags() {
    let man = output(&["--generate", "man"]).await;
    assert_eq!(man.status.code(), Some(0), "{}", text(&man.stderr));
    let page = text(&man.stdout);
    assert!(page.contains(".TH numstream-client"), "{page}");
    assert!(page.contains("Exit codes"), "{page}");
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = output(&["--generate", shell]).await;
        assert_eq!(script.status.code(), Some(0), "{shell}");
        assert!(text(&script.stdout).contains("client-id"), "{shell}");
    }
    let bad = output(&["--generate", "tcsh"]).await;
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad.stderr).contains("[possible values: man, bash, zsh"));
}
