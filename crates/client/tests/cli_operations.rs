//! The `numstream-client` binary as scripts and people use it: `--json`
//! output that matches `docs/client-report.schema.json` for every outcome,
//! `--verbose` reconnect lines, a quiet stderr when it is not a terminal,
//! and `--generate` for man pages and completions.

mod support;

use std::process::{Command, Output};

use numstream_protocol::{ErrorCode, ErrorFrame, Frame};
use serde_json::Value;
use support::*;

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
    let problems = schema::validate(&schema, &value, "$");
    assert!(
        problems.is_empty(),
        "{stdout} breaks the schema: {problems:#?}"
    );
    assert_eq!(value["ok"], out.status.code() == Some(0), "{stdout}");
    value
}

/// A fake server that drops the first connection after `numbers` numbers,
/// then serves the resume to the end; and its port.
async fn dropping_once_after(numbers: u16) -> (tokio::task::JoinHandle<u32>, String) {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut first = accept(&listener).await;
        let Frame::Open(open) = recv(&mut first).await else {
            panic!("expected OPEN");
        };
        send(&mut first, welcome(open.count, 0)).await;
        send_numbers(&mut first, open.count, 0..numbers).await;
        drop(first);
        let mut second = accept(&listener).await;
        match recv(&mut second).await {
            Frame::Resume(resume) => assert_eq!(resume.next_index, numbers),
            other => panic!("expected RESUME, got {other:?}"),
        }
        send(&mut second, welcome(open.count, numbers)).await;
        finish(&mut second, open.count, numbers).await
    });
    (server, port.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_reports_match_the_schema_for_success_rejection_and_violation() {
    // Success, after a dropped connection and a resume.
    let (server, port) = dropping_once_after(3).await;
    let ok = output(&["--port", &port, "--count", "9", "--json"]).await;
    join(server).await;
    let value = report(&ok);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
    assert_eq!(value["reconnects"], 1);
    assert_eq!(value["received"], 9);
    assert!(value["error"].is_null());

    // A final refusal: exit 3, no FINAL, the server's words in `error`.
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut conn = accept(&listener).await;
        recv(&mut conn).await;
        let refusal = ErrorFrame::new(ErrorCode::SessionExists, "already open elsewhere");
        send(&mut conn, Frame::Error(refusal)).await;
        closed_by_client(&mut conn).await;
    });
    let port = port.to_string();
    let refused = output(&["--port", &port, "--count", "65535", "--json"]).await;
    join(server).await;
    let value = report(&refused);
    assert_eq!(refused.status.code(), Some(3));
    assert!(value["server_checksum"].is_null());
    assert_eq!(value["client_checksum"], "0x00000000");
    let error = value["error"].as_str().expect("error text");
    assert!(error.contains("already open elsewhere"), "{error}");

    // A protocol violation part-way: exit 5, what arrived is reported.
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut conn = accept(&listener).await;
        recv(&mut conn).await;
        send(&mut conn, welcome(1, 0)).await;
        send(&mut conn, Frame::Number { index: 0, value: 7 }).await;
        closed_by_client(&mut conn).await;
    });
    let port = port.to_string();
    let broken = output(&["--port", &port, "--count", "1", "--json"]).await;
    join(server).await;
    let value = report(&broken);
    assert_eq!(broken.status.code(), Some(5));
    assert_eq!(value["count"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verbose_logs_each_reconnect_with_cause_and_delay_and_no_bar_off_a_terminal() {
    let (server, port) = dropping_once_after(2).await;
    let verbose = output(&["--port", &port, "--count", "5", "--verbose"]).await;
    join(server).await;
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
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut conn = accept(&listener).await;
        recv(&mut conn).await;
        send(&mut conn, welcome(3, 0)).await;
        finish(&mut conn, 3, 0).await
    });
    let port = port.to_string();
    let plain = output(&["--port", &port, "--count", "3"]).await;
    join(server).await;
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

/// The part of JSON Schema (2020-12) the report's schema uses, checked by
/// hand: `type`, `required`, `properties`, `additionalProperties: false`,
/// `minimum`, `maximum`, and `pattern` for patterns made of literals and
/// character classes with `{n}` counts. Any other keyword fails the test,
/// so the schema cannot grow a rule nobody checks.
mod schema {
    use serde_json::Value;

    const ANNOTATIONS: [&str; 4] = ["$schema", "$id", "title", "description"];

    pub(crate) fn validate(schema: &Value, value: &Value, path: &str) -> Vec<String> {
        let rules = schema.as_object().expect("a schema is an object");
        let mut problems = Vec::new();
        for (keyword, rule) in rules {
            match keyword.as_str() {
                k if ANNOTATIONS.contains(&k) => {}
                "type" => {
                    let allowed: Vec<&str> = match rule {
                        Value::String(one) => vec![one.as_str()],
                        Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
                        other => panic!("bad type rule {other}"),
                    };
                    if !allowed.iter().any(|kind| has_type(value, kind)) {
                        problems.push(format!("{path}: {value} is not {allowed:?}"));
                    }
                }
                "required" => {
                    for name in rule.as_array().expect("required is a list") {
                        let name = name.as_str().expect("required names are strings");
                        if value.get(name).is_none() {
                            problems.push(format!("{path}: {name} is missing"));
                        }
                    }
                }
                "properties" => {
                    let properties = rule.as_object().expect("properties is an object");
                    for (name, sub) in properties {
                        if let Some(field) = value.get(name) {
                            problems.extend(validate(sub, field, &format!("{path}.{name}")));
                        }
                    }
                }
                "additionalProperties" => {
                    assert_eq!(rule, &Value::Bool(false), "only `false` is supported");
                    let known = rules["properties"].as_object().expect("properties");
                    for name in value.as_object().into_iter().flat_map(|o| o.keys()) {
                        if !known.contains_key(name) {
                            problems.push(format!("{path}: unexpected key {name}"));
                        }
                    }
                }
                "minimum" | "maximum" => {
                    let bound = rule.as_f64().expect("numeric bound");
                    if let Some(number) = value.as_f64() {
                        let fits = if keyword == "minimum" {
                            number >= bound
                        } else {
                            number <= bound
                        };
                        if !fits {
                            problems.push(format!("{path}: {number} breaks {keyword} {bound}"));
                        }
                    }
                }
                "pattern" => {
                    let pattern = rule.as_str().expect("pattern is a string");
                    if let Some(text) = value.as_str()
                        && !matches(pattern, text)
                    {
                        problems.push(format!("{path}: {text:?} does not match {pattern}"));
                    }
                }
                other => panic!("the schema uses {other:?}, which this check does not know"),
            }
        }
        problems
    }

    fn has_type(value: &Value, kind: &str) -> bool {
        match kind {
            "object" => value.is_object(),
            "string" => value.is_string(),
            "integer" => value.is_u64() || value.is_i64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            "array" => value.is_array(),
            other => panic!("unknown type {other}"),
        }
    }

    /// Anchored patterns of literals and `[a-z0-9]` classes, each
    /// optionally followed by `{n}`.
    fn matches(pattern: &str, text: &str) -> bool {
        let body = pattern
            .strip_prefix('^')
            .and_then(|p| p.strip_suffix('$'))
            .unwrap_or_else(|| panic!("pattern {pattern} must be anchored"));
        let mut atoms: Vec<(Vec<(char, char)>, usize)> = Vec::new();
        let mut chars = body.chars().peekable();
        while let Some(c) = chars.next() {
            let class = match c {
                '[' => {
                    let mut ranges = Vec::new();
                    loop {
                        let low = chars.next().expect("unclosed class");
                        if low == ']' {
                            break;
                        }
                        if chars.peek() == Some(&'-') {
                            chars.next();
                            ranges.push((low, chars.next().expect("range end")));
                        } else {
                            ranges.push((low, low));
                        }
                    }
                    ranges
                }
                '{' => {
                    let digits: String = chars.by_ref().take_while(|c| *c != '}').collect();
                    let n: usize = digits.parse().expect("a count");
                    atoms.last_mut().expect("a count follows an atom").1 = n;
                    continue;
                }
                '(' | ')' | '|' | '*' | '+' | '?' | '.' | '\\' | '^' | '$' => {
                    panic!("pattern {pattern}: {c:?} is not supported here")
                }
                literal => vec![(literal, literal)],
            };
            atoms.push((class, 1));
        }
        let mut rest = text.chars();
        for (class, n) in atoms {
            for _ in 0..n {
                match rest.next() {
                    Some(c) if class.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)) => {}
                    _ => return false,
                }
            }
        }
        rest.next().is_none()
    }

    #[test]
    fn the_pattern_subset_works() {
        assert!(matches("^0x[0-9a-f]{8}$", "0x0123abcd"));
        assert!(!matches("^0x[0-9a-f]{8}$", "0x0123ABCD"));
        assert!(!matches("^0x[0-9a-f]{8}$", "0x0123abc"));
        assert!(!matches("^0x[0-9a-f]{8}$", "0x0123abcde"));
        assert!(matches("^[0-9a-f]{2}-x$", "ab-x"));
    }
}
