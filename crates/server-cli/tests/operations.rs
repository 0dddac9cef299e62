//! The `numstream-server` binary as an operator sees it: `/metrics` moving
//! with session events (created, resumed after a forced drop, completed,
//! expired, rejected), `/healthz`, `/readyz` following the Redis store, and
//! logs that name every session but never its resume token.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;

use numstream_harness::fault::{ConnectionPlan, Direction};
use numstream_harness::http::get;
use numstream_harness::process::{ServerCommand, ServerProcess};
use numstream_harness::proxy::FaultProxy;
use numstream_harness::raw::RawClient;
use numstream_harness::redis::RedisServer;
use numstream_harness::wait;
use numstream_protocol::{
    ClientId, ErrorCode, Frame, Open, Resume, ResumeToken, Welcome, encode_frame,
};

const BIN: &str = env!("CARGO_BIN_EXE_numstream-server");
/// Bound on anything a test polls for, so a bug fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(15);

/// A server process with its status endpoint on a port of its choosing.
async fn start(args: &[&str], env: &[(&str, &str)]) -> (ServerProcess, SocketAddr) {
    let mut command = ServerCommand::new(BIN)
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(args);
    for (key, value) in env {
        command = command.env(key, value);
    }
    let server = command.start().await.expect("start numstream-server");
    let status = server
        .status_address()
        .expect("started with --metrics-addr");
    (server, status)
}

/// A `/metrics` page as prometheus-parse reads it. A histogram's buckets
/// are one sample under the histogram's name; its `_sum` and `_count` are
/// samples of their own.
#[derive(Debug)]
struct Scrape(prometheus_parse::Scrape);

impl Scrape {
    fn parse(text: &str) -> Self {
        let lines = text.lines().map(|line| Ok(line.to_owned()));
        Self(prometheus_parse::Scrape::parse(lines).expect("a Prometheus text page"))
    }

    /// Every series of `name` carrying all of `labels`.
    fn series<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a prometheus_parse::Sample> {
        self.0.samples.iter().filter(move |sample| {
            sample.metric == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(key) == Some(*value))
        })
    }

    /// The sum over every series of `name` carrying all of `labels`; 0 when
    /// there is none (a labelled counter never touched).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        use prometheus_parse::Value;
        self.series(name, labels)
            .map(|sample| match &sample.value {
                Value::Counter(value) | Value::Gauge(value) | Value::Untyped(value) => *value,
                other => panic!("{name} is not a single value: {other:?}"),
            })
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.0.samples.iter().any(|sample| sample.metric == name)
    }

    /// Whether a series of `name` with all of `labels` exists at all.
    fn has_series(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.series(name, labels).next().is_some()
    }
}

async fn scrape(status: SocketAddr) -> Scrape {
    let (code, body) = get(status, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    Scrape::parse(&body)
}

/// Scrapes until `ready` holds, or panics with the last scrape.
async fn scrape_until(status: SocketAddr, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    wait::until_value(PATIENCE, what, || scrape(status), ready).await
}

async fn readyz_until(status: SocketAddr, code: u16) -> String {
    let what = format!("/readyz to answer {code}");
    let (_, body) = wait::until_value(
        PATIENCE,
        &what,
        || get(status, "/readyz"),
        |(got, _)| *got == code,
    )
    .await;
    body
}

/// Reads numbers `from..` in order up to FINAL, acknowledges it (with the
/// server's own checksum: only a mismatch is logged) and sees the close.
async fn read_to_the_end(client: &mut RawClient, from: u16) {
    let mut expected = from;
    let checksum = loop {
        match client.frame().await {
            Frame::Number { index, .. } => {
                assert_eq!(index, expected);
                expected += 1;
            }
            Frame::Final {
                index, checksum, ..
            } => {
                assert_eq!(index, expected);
                break checksum;
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    client
        .send(Frame::Ack {
            client_checksum: checksum,
        })
        .await;
    client.expect_closed().await;
}

/// Resumes a session at `from` on a new connection and reads it to the end.
async fn resume_to_the_end(server: SocketAddr, client_id: ClientId, token: ResumeToken, from: u16) {
    let mut client = RawClient::connect(server).await;
    client
        .send(Frame::Resume(Resume {
            client_id,
            token,
            next_index: from,
        }))
        .await;
    assert!(matches!(client.frame().await, Frame::Welcome(_)));
    read_to_the_end(&mut client, from).await;
}

/// A RESUME of a session nobody opened, refused with `session_unknown`.
async fn resume_an_unknown_session(server: SocketAddr) {
    let mut unknown = RawClient::connect(server).await;
    unknown
        .send(Frame::Resume(Resume {
            client_id: ClientId::new_v4(),
            token: ResumeToken([7; 16]),
            next_index: 0,
        }))
        .await;
    unknown.expect_error(ErrorCode::SessionUnknown).await;
}

fn frame_value(frame: &Frame) -> u32 {
    match frame {
        Frame::Number { value, .. } => *value,
        other => panic!("expected a NUMBER, got {other:?}"),
    }
}

fn encoded_len(frame: &Frame) -> usize {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf);
    buf.len()
}

const COUNTERS: [&str; 8] = [
    "numstream_sessions_created_total",
    "numstream_sessions_resumed_total",
    "numstream_sessions_completed_total",
    "numstream_sessions_expired_total",
    "numstream_sessions_detached_total",
    "numstream_sessions_taken_over_total",
    "numstream_numbers_sent_total",
    "numstream_numbers_replayed_total",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_sessions_through_a_drop_a_resume_completion_and_expiry() {
    let (server, status) = start(
        &["--interval", "10ms", "--session-ttl", "1s", "--seed", "42"],
        &[],
    )
    .await;
    // Nothing has connected yet: the launcher learns the port from the
    // ready file, not by probing.
    let before = scrape_until(status, "a fresh server", |s| {
        s.value("numstream_connections_accepted_total", &[]) == 0.0
            && s.value("numstream_connections", &[]) == 0.0
    })
    .await;
    for counter in COUNTERS {
        assert!(before.has(counter), "{counter} missing: {before:#?}");
        assert_eq!(before.value(counter, &[]), 0.0, "{counter}");
    }
    assert_eq!(
        before.value(
            "numstream_build_info",
            &[("store", "memory"), ("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // A session whose first connection the proxy cuts in the middle of its
    // sixth number, stepped by hand so every state can be scraped.
    let proxy = FaultProxy::start_queue(server.addr()).await.expect("proxy");
    let welcome_len = encoded_len(&Frame::Welcome(Welcome {
        count: 1,
        next_index: 0,
        token: ResumeToken([0; 16]),
        interval_us: 0,
        session_ttl_ms: 0,
    }));
    let number_len = encoded_len(&Frame::Number { index: 0, value: 0 });
    proxy.planner().push([close_downstream(
        welcome_len + 5 * number_len + number_len / 2,
    )]);
    let count: u16 = 60;
    let client_id = ClientId::new_v4();
    let mut first = RawClient::connect(proxy.addr()).await;
    first.send(Frame::Open(Open { client_id, count })).await;
    let Frame::Welcome(welcome) = first.frame().await else {
        panic!("expected WELCOME");
    };
    let mut received: u16 = 0;
    while let Some(Ok(frame)) = first.recv().await {
        assert_eq!(
            frame,
            Frame::Number {
                index: received,
                value: frame_value(&frame)
            }
        );
        received += 1;
    }
    assert_eq!(received, 5, "the cut falls inside the sixth number");

    // Sampled gauges and counters are read one after the other, so wait
    // for a scrape that shows the whole state.
    let dropped = scrape_until(status, "the detach", |s| {
        s.value("numstream_sessions_detached_total", &[]) == 1.0
            && s.value("numstream_sessions_awaiting_resume", &[]) == 1.0
    })
    .await;
    assert_eq!(dropped.value("numstream_sessions_created_total", &[]), 1.0);
    assert_eq!(dropped.value("numstream_sessions_attached", &[]), 0.0);
    assert_eq!(dropped.value("numstream_sessions_open", &[]), 1.0);

    let mut second = RawClient::connect(proxy.addr()).await;
    second
        .send(Frame::Resume(Resume {
            client_id,
            token: welcome.token,
            next_index: received,
        }))
        .await;
    assert!(matches!(second.frame().await, Frame::Welcome(_)));
    let streaming = scrape(status).await;
    assert_eq!(
        streaming.value("numstream_sessions_resumed_total", &[]),
        1.0
    );
    assert_eq!(streaming.value("numstream_sessions_attached", &[]), 1.0);
    assert_eq!(
        streaming.value("numstream_sessions_awaiting_resume", &[]),
        0.0
    );
    assert_eq!(streaming.value("numstream_connections", &[]), 1.0);
    assert_eq!(
        streaming.value("numstream_time_to_resume_seconds_count", &[]),
        1.0,
        "the drop was seen here, so the wait until the resume is measured"
    );
    // The sixth number went out whole but arrived cut: it is sent again.
    assert!(streaming.value("numstream_numbers_replayed_total", &[]) >= 1.0);

    read_to_the_end(&mut second, received).await;

    let after = scrape_until(status, "the completion", |s| {
        s.value("numstream_sessions_completed_total", &[]) == 1.0
            && s.value("numstream_sessions_open", &[]) == 0.0
    })
    .await;
    assert_eq!(after.value("numstream_sessions_attached", &[]), 0.0);
    assert_eq!(after.value("numstream_sessions_expired_total", &[]), 0.0);
    assert_eq!(after.value("numstream_sessions_taken_over_total", &[]), 0.0);
    let sent = after.value("numstream_numbers_sent_total", &[]);
    let replayed = after.value("numstream_numbers_replayed_total", &[]);
    assert_eq!(
        sent,
        f64::from(count) + replayed,
        "each number once, plus replays"
    );
    assert_eq!(
        after.value("numstream_send_lateness_seconds_count", &[]),
        sent,
        "one lateness sample per number"
    );
    assert_eq!(
        after.value("numstream_connections_accepted_total", &[])
            - before.value("numstream_connections_accepted_total", &[]),
        2.0,
        "the two connections of the session"
    );
    for op in ["create", "attach", "detach", "complete"] {
        assert_eq!(
            after.value(
                "numstream_store_operation_duration_seconds_count",
                &[("op", op), ("store", "memory")]
            ),
            1.0,
            "{op}"
        );
    }

    // A session whose client vanishes for good expires one TTL later.
    let mut vanishing = RawClient::connect(server.addr()).await;
    vanishing
        .send(Frame::Open(Open {
            client_id: ClientId::new_v4(),
            count: 500,
        }))
        .await;
    assert!(matches!(vanishing.frame().await, Frame::Welcome(_)));
    drop(vanishing);
    let expired = scrape_until(status, "the expiry", |s| {
        s.value("numstream_sessions_expired_total", &[]) == 1.0
            && s.value("numstream_sessions_open", &[]) == 0.0
    })
    .await;
    assert_eq!(expired.value("numstream_sessions_detached_total", &[]), 2.0);

    // Refusals are counted by error code, broken handshakes by reason.
    resume_an_unknown_session(server.addr()).await;
    let mut garbage = RawClient::connect(server.addr()).await;
    garbage.send_bytes(b"GET / HTTP/1.1\r\n\r\n").await;
    garbage.expect_error(ErrorCode::Malformed).await;
    let refused = scrape_until(status, "the refusals", |s| {
        s.value("numstream_rejections_total", &[("code", "malformed")]) == 1.0
    })
    .await;
    assert_eq!(
        refused.value("numstream_rejections_total", &[("code", "session_unknown")]),
        1.0
    );
    assert_eq!(
        refused.value(
            "numstream_handshake_failures_total",
            &[("reason", "malformed")]
        ),
        1.0
    );

    // Liveness, readiness and the rest of the endpoint.
    assert_eq!(get(status, "/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(get(status, "/readyz").await, (200, "ready\n".to_owned()));
    assert_eq!(scrape(status).await.value("numstream_ready", &[]), 1.0);
    let (code, body) = get(status, "/nothing").await;
    assert_eq!(code, 404);
    assert!(body.contains("/metrics"), "{body}");
}

/// One metric family as exported or documented: its type and label names.
type Catalog = BTreeMap<String, (String, BTreeSet<String>)>;

/// The families on a `/metrics` page, read with a Prometheus text parser.
/// A histogram's `_sum` and `_count` series belong to its family; its `le`
/// label is the buckets', not the metric's.
fn exported_families(page: &str) -> Catalog {
    let scrape = prometheus_parse::Scrape::parse(page.lines().map(|line| Ok(line.to_owned())))
        .expect("a Prometheus text page");
    let histograms: BTreeSet<String> = scrape
        .samples
        .iter()
        .filter(|sample| matches!(sample.value, prometheus_parse::Value::Histogram(_)))
        .map(|sample| sample.metric.clone())
        .collect();
    let mut families = Catalog::new();
    for sample in &scrape.samples {
        let kind = match sample.value {
            prometheus_parse::Value::Counter(_) => "counter",
            prometheus_parse::Value::Gauge(_) => "gauge",
            prometheus_parse::Value::Histogram(_) => "histogram",
            prometheus_parse::Value::Summary(_) => "summary",
            prometheus_parse::Value::Untyped(_) => {
                let of_a_histogram = ["_sum", "_count"].iter().any(|suffix| {
                    sample
                        .metric
                        .strip_suffix(suffix)
                        .is_some_and(|family| histograms.contains(family))
                });
                if of_a_histogram {
                    continue;
                }
                "untyped"
            }
        };
        let labels = sample.labels.keys().map(String::to_owned);
        let (_, names) = families
            .entry(sample.metric.clone())
            .or_insert_with(|| (kind.to_owned(), BTreeSet::new()));
        names.extend(labels);
    }
    families
}

/// The families in the metrics table of docs/operations.md, one row each:
/// metric name, type, label names, meaning.
fn documented_families(operations_md: &str) -> Catalog {
    let section = operations_md
        .split_once("\n## Metrics\n")
        .and_then(|(_, rest)| rest.split("\n## ").next())
        .expect("docs/operations.md has a Metrics section");
    section
        .lines()
        .filter(|line| line.starts_with("| `numstream_"))
        .map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let [_, name, kind, labels, ..] = cells[..] else {
                panic!("a metrics row with fewer than three columns: {row}");
            };
            let labels = labels
                .split(',')
                .map(|label| label.trim().trim_matches('`'))
                .filter(|label| !label.is_empty())
                .map(str::to_owned)
                .collect();
            (name.trim_matches('`').to_owned(), (kind.to_owned(), labels))
        })
        .collect()
}

/// What `/metrics` exports after a session went through every event that
/// registers or first samples a series (a drop seen here, a resume, a
/// completion, a refusal) is exactly what docs/operations.md documents,
/// type and labels included, and the names follow the Prometheus and
/// OpenMetrics rules: a counter ends in `_total` and nothing else does, and
/// no two families share a name once `_total` is stripped (OpenMetrics
/// parsers would merge them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exported_metric_is_documented_and_every_documented_one_is_exported() {
    let (server, status) = start(&["--interval", "10ms"], &[]).await;
    let client_id = ClientId::new_v4();
    let mut first = RawClient::connect(server.addr()).await;
    first
        .send(Frame::Open(Open {
            client_id,
            count: 30,
        }))
        .await;
    let Frame::Welcome(welcome) = first.frame().await else {
        panic!("expected WELCOME");
    };
    assert!(matches!(
        first.frame().await,
        Frame::Number { index: 0, .. }
    ));
    drop(first);
    // Resumed only once the drop was seen, so the time to resume is timed.
    scrape_until(status, "the detach", |s| {
        s.value("numstream_sessions_detached_total", &[]) == 1.0
    })
    .await;
    resume_to_the_end(server.addr(), client_id, welcome.token, 1).await;
    resume_an_unknown_session(server.addr()).await;
    scrape_until(status, "the completion", |s| {
        s.value("numstream_sessions_completed_total", &[]) == 1.0
            && s.value("numstream_time_to_resume_seconds_count", &[]) == 1.0
    })
    .await;

    let (code, page) = get(status, "/metrics").await;
    assert_eq!(code, 200, "{page}");
    let exported = exported_families(&page);
    let documented = documented_families(include_str!("../../../docs/operations.md"));
    let undocumented: Vec<_> = exported
        .keys()
        .filter(|name| !documented.contains_key(*name))
        .collect();
    let missing: Vec<_> = documented
        .keys()
        .filter(|name| !exported.contains_key(*name))
        .collect();
    assert!(
        undocumented.is_empty() && missing.is_empty(),
        "exported but not in docs/operations.md: {undocumented:?}; \
         documented but not exported: {missing:?}"
    );
    assert_eq!(
        exported, documented,
        "types and label names, exported (left) and documented (right)"
    );

    let mut families = BTreeSet::new();
    for (name, (kind, _)) in &exported {
        assert_eq!(
            name.ends_with("_total"),
            kind == "counter",
            "{name} is a {kind}: counters, and only counters, end in _total"
        );
        let family = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            families.insert(family.to_owned()),
            "{name} shares its family name {family} with another metric"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_the_redis_store_is_down_and_recovers() {
    let mut redis = RedisServer::start();
    let url = format!("{}0", redis.url());
    let (_server, status) = start(&["--store", &url, "--session-ttl", "3s"], &[]).await;
    readyz_until(status, 200).await;

    redis.stop();
    let why = readyz_until(status, 503).await;
    assert!(why.starts_with("not ready: redis store"), "{why}");
    let down = scrape(status).await;
    assert!(
        down.value(
            "numstream_store_errors_total",
            &[("store", "redis"), ("op", "ping")]
        ) >= 1.0,
        "{down:#?}"
    );
    assert_eq!(get(status, "/healthz").await.0, 200, "still alive");
    assert_eq!(
        down.value("numstream_ready", &[]),
        0.0,
        "the metric says what /readyz says"
    );
    assert!(
        !down.has("numstream_sessions_open"),
        "a shared store's sessions are nobody's to count"
    );
    assert_eq!(
        down.value("numstream_build_info", &[("store", "redis")]),
        1.0
    );

    redis.restart();
    readyz_until(status, 200).await;
    // No session streams, so no renewal waits: the gauge is there, at 0.
    let up = scrape(status).await;
    let renewal_lag = [("store", "redis")];
    assert!(
        up.has_series("numstream_store_renewal_lag_seconds", &renewal_lag),
        "{up:#?}"
    );
    assert_eq!(
        up.value("numstream_store_renewal_lag_seconds", &renewal_lag),
        0.0
    );
}

/// `/readyz` tells a load balancer to send new clients elsewhere while they
/// would only be told `server_busy`: every connection slot taken, or the
/// session store full; and takes it back once there is room again. The
/// refusals are counted by reason.
#[tokio::test]
async fn readyz_fails_while_the_server_is_saturated() {
    let (server, status) = start(
        &[
            "--max-connections",
            "2",
            "--max-sessions",
            "3",
            "--interval",
            "1s",
        ],
        &[],
    )
    .await;
    let address = server.addr();
    readyz_until(status, 200).await;

    // Two streaming connections hold both connection slots.
    let mut streaming = Vec::new();
    for _ in 0..2 {
        let mut client = RawClient::opened(address, 1000).await;
        assert!(matches!(client.frame().await, Frame::Welcome(_)));
        streaming.push(client);
    }
    let why = readyz_until(status, 503).await;
    assert!(
        why.contains("at its connection limit (2 connections)"),
        "{why}"
    );
    let mut refused = RawClient::connect(address).await;
    refused.expect_error(ErrorCode::ServerBusy).await;

    // Dropped, their sessions wait for a resume: 2 of 3 held, room again.
    drop(streaming);
    readyz_until(status, 200).await;
    // A third session fills the store.
    let mut third = RawClient::connect(address).await;
    third
        .send(Frame::Open(Open {
            client_id: ClientId::new_v4(),
            count: 1000,
        }))
        .await;
    assert!(matches!(third.frame().await, Frame::Welcome(_)));
    let why = readyz_until(status, 503).await;
    assert!(
        why.contains("at its session limit (3 of 3 sessions)"),
        "{why}"
    );

    let counts = scrape(status).await;
    assert_eq!(
        counts.value(
            "numstream_admission_refusals_total",
            &[("reason", "connections")]
        ),
        1.0,
        "{counts:#?}"
    );
    for reason in ["sessions", "overload", "sessions_per_address"] {
        assert!(
            counts.has_series("numstream_admission_refusals_total", &[("reason", reason)]),
            "every reason is exported from the start: {reason}"
        );
    }
    assert_eq!(counts.value("numstream_overloaded", &[]), 0.0);
    assert!(counts.has("numstream_scheduling_lag_seconds"));
    assert_eq!(
        counts.value("numstream_stream_limit", &[]),
        f64::INFINITY,
        "no stream limit until the server first runs short"
    );
}

/// Runs a session with a drop and a resume (and a forged resume) against a
/// server logging at debug level in `format`, and returns its log with the
/// client id and both tokens.
async fn session_logged(format: &str) -> (String, ClientId, [ResumeToken; 2]) {
    let (server, _status) = start(
        &["--interval", "2ms", "--log-format", format],
        &[("RUST_LOG", "debug")],
    )
    .await;
    let addr = server.addr();
    let client_id = ClientId::new_v4();
    let count = 30;
    let mut first = RawClient::connect(addr).await;
    first.send(Frame::Open(Open { client_id, count })).await;
    let Frame::Welcome(welcome) = first.frame().await else {
        panic!("expected WELCOME");
    };
    for _ in 0..5 {
        assert!(matches!(first.frame().await, Frame::Number { .. }));
    }
    drop(first);

    let forged = ResumeToken([0xc3; 16]);
    let mut intruder = RawClient::connect(addr).await;
    intruder
        .send(Frame::Resume(Resume {
            client_id,
            token: forged,
            next_index: 5,
        }))
        .await;
    intruder.expect_error(ErrorCode::BadResumeToken).await;

    resume_to_the_end(addr, client_id, welcome.token, 5).await;

    wait::until_value(
        PATIENCE,
        "the session's completion in the log",
        || std::future::ready(server.log()),
        |log| log.contains("session completed"),
    )
    .await;
    (server.log(), client_id, [welcome.token, forged])
}

fn assert_no_token(log: &str, tokens: &[ResumeToken]) {
    for token in tokens {
        let lower: String = token.0.iter().map(|b| format!("{b:02x}")).collect();
        let upper = lower.to_uppercase();
        let decimal = format!("{:?}", token.0);
        let spaced: String = token.0.iter().map(|b| format!("{b:02x} ")).collect();
        for shape in [&lower, &upper, &decimal, spaced.trim_end()] {
            assert!(
                !log.contains(shape),
                "a resume token ({shape}) appears in the log:\n{log}"
            );
        }
        // No 8-byte run of the token in hex either.
        for window in lower.as_bytes().chunks(16) {
            let window = std::str::from_utf8(window).expect("hex");
            assert!(!log.contains(window), "part of a token in the log:\n{log}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_name_every_session_line_and_never_a_token() {
    let (log, client_id, tokens) = session_logged("text").await;
    assert_no_token(&log, &tokens);
    assert!(
        !log.contains('\u{1b}'),
        "no ANSI escapes off a terminal:\n{log}"
    );
    let id = format!("client_id={client_id}");
    for (event, generation) in [
        ("session opened", "generation=1"),
        ("session detached", "generation=1"),
        ("session resumed", "generation=2"),
        ("session completed", "generation=2"),
    ] {
        let line = log
            .lines()
            .find(|line| line.contains(event))
            .unwrap_or_else(|| panic!("no {event:?} line in\n{log}"));
        assert!(line.contains(&id), "{line}");
        assert!(line.contains(generation), "{line}");
    }
    let refused = log
        .lines()
        .find(|line| line.contains("bad_resume_token"))
        .unwrap_or_else(|| panic!("the forged resume is not logged:\n{log}"));
    assert!(refused.contains(&id), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_and_never_carry_a_token() {
    let (log, client_id, tokens) = session_logged("json").await;
    assert_no_token(&log, &tokens);
    let id = client_id.to_string();
    let mut session_lines = 0;
    for line in log.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
        assert!(value["timestamp"].is_string(), "{line}");
        assert!(value["level"].is_string(), "{line}");
        let message = value["message"].as_str().unwrap_or_default();
        if message.starts_with("session ") && message != "session expired" {
            session_lines += 1;
            assert_eq!(value["client_id"], id.as_str(), "{line}");
            assert!(value["generation"].is_u64(), "{line}");
            assert!(value["peer"].is_string(), "{line}");
        }
    }
    assert!(session_lines >= 4, "{log}");
}

/// Closes the connection once `bytes` came down from the server.
fn close_downstream(bytes: usize) -> ConnectionPlan {
    ConnectionPlan::close_after(Direction::Downstream, bytes as u64)
}
