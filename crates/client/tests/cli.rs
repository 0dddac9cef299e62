//! The `numstream-client` binary as a user runs it: flags, stdout, exit
//! codes.

mod support;

use std::process::{Command, Output};

use numstream_protocol::Frame;
use support::*;

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
        stderr(&out).contains("count must be between 1 and 65535"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());
    let zero = output(&["--port", "7000", "--count", "0"]);
    assert_eq!(zero.status.code(), Some(2));
    assert!(stderr(&zero).contains("count must be between 1 and 65535"));
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
