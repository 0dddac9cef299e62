//! What the client's tests share: the harness's scripted fake server (real
//! TCP on 127.0.0.1) or in-memory pipes (`memory`) for the other end, a
//! client config with fast retries, and bounded client runs.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub(crate) mod memory;

use std::time::Duration;

use numstream_client::{Backoff, ClientConfig, ClientError, Event, Observer, Report};

// Each test binary uses a different subset of these too.
#[allow(unused_imports)]
pub(crate) use numstream_harness::fake_server::{
    Expect, FakeServer, PATIENCE, SEED, Script, TOKEN, accept, acked, expected, finish, join,
    join_within, listen, number, recv, send, session, welcome, welcome_with,
};
#[allow(unused_imports)]
pub(crate) use numstream_harness::raw::closed_port;

/// A config with fast retries, so tests that reconnect stay quick.
pub(crate) fn config(ports: Vec<u16>, count: u16) -> ClientConfig {
    ClientConfig {
        ports,
        count,
        backoff: Backoff {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(50),
            multiplier: 2.0,
        },
        // Scaled down like `backoff`, but distinct, so a test sees which
        // one a refusal used.
        busy_backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
            multiplier: 2.0,
        },
        connect_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    }
}

/// Runs the client to the end, failing the test if it does not finish
/// within [`PATIENCE`].
pub(crate) async fn run_client(config: ClientConfig) -> (Report, Vec<Event>) {
    run_client_within(config, PATIENCE).await
}

/// [`run_client`] with another bound: paused-time tests run minutes of
/// virtual time, and a hang still fails once the bound has passed.
pub(crate) async fn run_client_within(
    config: ClientConfig,
    limit: Duration,
) -> (Report, Vec<Event>) {
    let mut events: Vec<Event> = Vec::new();
    let report = tokio::time::timeout(limit, numstream_client::run(config, &mut events))
        .await
        .expect("client hung");
    (report, events)
}

/// [`run_client`] over in-memory connections to `net`'s ports.
pub(crate) async fn run_client_in(
    net: &memory::MemoryNet,
    config: ClientConfig,
) -> (Report, Vec<Event>) {
    let mut events: Vec<Event> = Vec::new();
    let run = numstream_client::run_with(config, net, &mut events);
    let report = tokio::time::timeout(PATIENCE, run)
        .await
        .expect("client hung");
    (report, events)
}

/// A first connection that opens, is welcomed and gets the numbers
/// `0..upto` of a `count`-number session, then is cut.
pub(crate) fn streamed_then_cut(count: u16, upto: u16) -> Script {
    Script::new()
        .expect(Expect::Open)
        .send(welcome(count, 0))
        .send_numbers(&session(count), 0..upto)
        .cut()
}

/// The run failed with `exit_code`, with `expect_in_error` in its error,
/// and nothing in its output says OK.
pub(crate) fn assert_failed(report: &Report, exit_code: u8, expect_in_error: &str) {
    let text = report.render_human();
    assert!(!report.ok, "{text}");
    assert_eq!(report.exit_code(), exit_code, "{text}");
    assert!(!text.contains("result           OK"), "{text}");
    assert_eq!(report.to_json()["ok"], serde_json::Value::Bool(false));
    let error = report
        .error
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(
        error.contains(expect_in_error),
        "error {error:?} should mention {expect_in_error:?}"
    );
}

/// A server that answers the client's OPEN with `raw` (bytes as they
/// are) on its only connection: the client must fail with a protocol
/// violation naming `expect_in_error` (exit 5) after taking `received`
/// numbers, close the connection, and never retry a lying server.
pub(crate) async fn assert_violation(
    count: u16,
    raw: Vec<Vec<u8>>,
    received: u16,
    expect_in_error: &str,
) {
    let script = raw
        .into_iter()
        .fold(Script::new().expect(Expect::Open), Script::send_raw);
    let server = FakeServer::start(vec![script.expect_closed()]).await;
    let (report, events) = run_client(config(vec![server.port()], count)).await;
    server.finish().await;
    assert_failed(&report, 5, expect_in_error);
    assert!(
        matches!(report.error, Some(ClientError::ProtocolViolation(_))),
        "{:?}",
        report.error
    );
    assert_eq!(report.received, received, "numbers before the violation");
    assert!(
        reconnect_events(&events).is_empty(),
        "violations are not retried"
    );
    assert_eq!(report.reconnects, 0);
}

pub(crate) fn reconnect_events(events: &[Event]) -> Vec<(String, Duration)> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::Reconnecting { cause, delay, .. } => Some((cause.clone(), *delay)),
            _ => None,
        })
        .collect()
}

/// An observer that is usable from another crate's point of view: only the
/// public trait and enum.
#[derive(Debug, Default)]
pub(crate) struct Counting {
    pub(crate) numbers: u32,
}

impl Observer for Counting {
    fn event(&mut self, event: &Event) {
        if let Event::Number { .. } = event {
            self.numbers += 1;
        }
    }
}
