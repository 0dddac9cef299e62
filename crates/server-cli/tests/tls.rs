//! numstream over TLS, end to end: sessions that stream, drop and resume
//! (on another instance too, with the Redis store), every mismatch between
//! client and server failing at once with its cause, mutual TLS, the TLS
//! handshake held to the handshake timeout and slots, and the certificate
//! reloaded on SIGHUP without dropping a connection. Certificates are made
//! at run time (`numstream_harness::tls::TestPki`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use numstream_client::{Backoff, ClientConfig, ClientError, ClientTls, Event, Report, TlsOptions};
use numstream_harness::fault::{ConnectionPlan, Direction};
use numstream_harness::process::{ServerCommand, ServerProcess, Signal};
use numstream_harness::proxy::FaultProxy;
use numstream_harness::raw::{RawClient, connect_from};
use numstream_harness::redis::RedisServer;
use numstream_harness::tls::{CertFiles, TestPki, peer_certificate};
use numstream_harness::wait;
use numstream_protocol::{ErrorCode, SequenceChecksum, SessionSeed};
use numstream_server::testing::{TestServer, fast_config};
use numstream_server::{PeerLimits, ServerConfig, ServerTls};
use numstream_store_redis::{DEFAULT_PREFIX, RedisStore};

const BIN: &str = env!("CARGO_BIN_EXE_numstream-server");
/// `fast_config`'s seed: every sequence is known in advance.
const SEED: u64 = 42;
/// Bound on any client run, so a hang fails instead of blocking CI.
const RUN_LIMIT: Duration = Duration::from_secs(60);

fn client(ports: Vec<u16>, count: u16, tls: Option<ClientTls>) -> ClientConfig {
    ClientConfig {
        ports,
        count,
        tls,
        backoff: Backoff {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(100),
            multiplier: 2.0,
        },
        // Long: a mismatch that were retried would show as many attempts
        // (and a CannotConnect), never as a quick TLS error.
        open_timeout: Duration::from_secs(30),
        ..ClientConfig::default()
    }
}

async fn run(config: ClientConfig) -> (Report, Vec<Event>) {
    let mut events = Vec::new();
    let report = tokio::time::timeout(RUN_LIMIT, numstream_client::run(config, &mut events))
        .await
        .expect("the client run must end");
    (report, events)
}

fn connections(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|event| matches!(event, Event::Connected { .. }))
        .count()
}

fn assert_undisturbed(report: &Report) {
    assert!(report.ok, "{}", report.render_human());
    let expected =
        SequenceChecksum::of_session(&SessionSeed::derive(SEED, report.client_id), report.count);
    assert_eq!(report.received, report.count);
    assert_eq!(report.sum, expected.sum());
    assert_eq!(report.server_checksum, Some(expected.checksum()));
    assert_eq!(report.client_checksum, expected.checksum());
}

fn tls_server_config(pki: &TestPki, mutual: bool) -> ServerConfig {
    ServerConfig {
        tls: Some(server_tls(pki, &pki.server, mutual)),
        ..fast_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_over_tls_streams_drops_resumes_and_verifies() {
    let pki = TestPki::generate();
    let server = TestServer::start(tls_server_config(&pki, false)).await;
    let proxy = FaultProxy::start_queue(server.addr).await.expect("proxy");
    // The first connection is cut inside the stream: after the handshake
    // (about 1.5 KB with these certificates) and some numbers.
    proxy.planner().push([close_downstream(4_000)]);
    let (report, events) = run(client(
        vec![proxy.port()],
        400,
        Some(client_tls(&pki, None)),
    ))
    .await;
    assert_undisturbed(&report);
    assert!(report.reconnects >= 1, "the cut must have forced a resume");
    assert!(connections(&events) >= 2);
}

/// A plain client, a TLS client against a plain server, an untrusted, an
/// expired and a misnamed certificate: each ends the run after its first
/// connection with the cause in the error, never retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mismatch_fails_on_the_first_connection_naming_its_cause() {
    let pki = TestPki::generate();
    let tls_server = TestServer::start(tls_server_config(&pki, false)).await;
    let plain_server = TestServer::start(fast_config()).await;
    let with_cert = |certificate| {
        let config = ServerConfig {
            tls: Some(server_tls(&pki, certificate, false)),
            ..fast_config()
        };
        TestServer::start(config)
    };
    let untrusted = with_cert(&pki.untrusted).await;
    let expired = with_cert(&pki.expired).await;
    let misnamed = with_cert(&pki.wrong_name).await;
    let trusting = Some(client_tls(&pki, None));

    let cases: [(&str, ClientConfig, &str); 5] = [
        (
            "plaintext client, TLS server",
            client(vec![tls_server.port()], 10, None),
            "speaks numstream over TLS only",
        ),
        (
            "TLS client, plaintext server",
            client(vec![plain_server.port()], 10, trusting.clone()),
            "answered in plaintext, not TLS",
        ),
        (
            "untrusted certificate",
            client(vec![untrusted.port()], 10, trusting.clone()),
            "not signed by a trusted CA",
        ),
        (
            "expired certificate",
            client(vec![expired.port()], 10, trusting.clone()),
            "certificate has expired",
        ),
        (
            "wrong server name",
            client(vec![misnamed.port()], 10, trusting.clone()),
            "not valid for the name 127.0.0.1",
        ),
    ];
    for (case, config, cause) in cases {
        let (report, events) = run(config).await;
        let error = report
            .error
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(!report.ok, "{case}: {}", report.render_human());
        assert!(error.contains(cause), "{case}: {error}");
        assert_eq!(connections(&events), 1, "{case}: retried: {events:?}");
        let expected_exit = if case.starts_with("plaintext client") {
            numstream_client::EXIT_REJECTED
        } else {
            numstream_client::EXIT_TLS
        };
        assert_eq!(report.exit_code(), expected_exit, "{case}: {error}");
    }
    // --tls-server-name overrides the host, and is checked like it.
    let mut named = client(vec![tls_server.port()], 10, None);
    named.tls = Some(
        ClientTls::new(&numstream_client::TlsOptions {
            ca: Some(pki.ca.clone()),
            server_name: Some("elsewhere.invalid".to_owned()),
            ..Default::default()
        })
        .expect("settings"),
    );
    let (report, events) = run(named).await;
    let error = report
        .error
        .map(|error| error.to_string())
        .unwrap_or_default();
    assert!(
        error.contains("not valid for the name elsewhere.invalid"),
        "{error}"
    );
    assert_eq!(connections(&events), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_serves_only_clients_with_a_certificate_from_the_client_ca() {
    let pki = TestPki::generate();
    let server = TestServer::start(tls_server_config(&pki, true)).await;
    let port = server.port();

    let (report, _) = run(client(
        vec![port],
        20,
        Some(client_tls(&pki, Some(&pki.client))),
    ))
    .await;
    assert_undisturbed(&report);

    for (identity, cause) in [
        (None, "requires a client certificate"),
        (Some(&pki.stranger), "refused our client certificate"),
    ] {
        let (report, events) = run(client(vec![port], 20, Some(client_tls(&pki, identity)))).await;
        match &report.error {
            Some(ClientError::Tls { message }) => assert!(message.contains(cause), "{message}"),
            other => panic!("expected a TLS error containing {cause:?}, got {other:?}"),
        }
        assert_eq!(connections(&events), 1, "retried: {events:?}");
    }
}

/// A TLS server with a 1 s handshake timeout that lets each address have
/// one handshake under way.
async fn one_handshake_per_address(pki: &TestPki) -> TestServer {
    TestServer::start(ServerConfig {
        handshake_timeout: Duration::from_secs(1),
        per_address: PeerLimits {
            handshakes: Some(1),
            ..PeerLimits::UNLIMITED
        },
        ..tls_server_config(pki, false)
    })
    .await
}

/// A peer that opens TCP and starts TLS but never finishes holds a
/// handshake slot of its address only until the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_that_never_finishes_is_closed_at_the_handshake_timeout() {
    let pki = TestPki::generate();
    let server = one_handshake_per_address(&pki).await;
    let address: IpAddr = "127.0.11.1".parse().expect("address");
    let mut staller = connect_from(address, server.addr).await.expect("connect");
    // The start of a TLS record, and then nothing.
    staller.write_all(&[0x16, 0x03, 0x01]).await.expect("write");

    // While it stalls, the address's one handshake slot is taken.
    let mut second = RawClient::connect_from(address, server.addr).await;
    second.expect_error(ErrorCode::ServerBusy).await;

    // The server gives up on it (bounded by the read below, not by a
    // clock in this test).
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), staller.read_to_end(&mut rest))
        .await
        .expect("the server must close a stalled TLS handshake");
    assert!(read.is_ok() || rest.is_empty(), "{read:?}");

    // And the slot is free again.
    let mut config = client(vec![server.port()], 5, Some(client_tls(&pki, None)));
    config.local_addr = Some(address);
    let (report, _) = run(config).await;
    assert_undisturbed(&report);
}

/// Refusals made before TLS starts (here: the address's handshake slot is
/// taken) reach a TLS client as plaintext `server_busy`, which it honours
/// by retrying rather than taking it for a server without TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_answer_before_tls_is_retried_by_a_tls_client() {
    let pki = TestPki::generate();
    let server = one_handshake_per_address(&pki).await;
    let address: IpAddr = "127.0.11.2".parse().expect("address");
    let staller = connect_from(address, server.addr).await.expect("connect");
    let mut config = client(vec![server.port()], 5, Some(client_tls(&pki, None)));
    config.local_addr = Some(address);
    let (report, events) = run(config).await;
    drop(staller);
    assert_undisturbed(&report);
    let busy = events.iter().any(
        |event| matches!(event, Event::Reconnecting { cause, .. } if cause.contains("server_busy")),
    );
    assert!(
        busy,
        "the first attempt must have met server_busy: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_on_another_instance_over_tls_with_the_redis_store() {
    let pki = TestPki::generate();
    let redis = RedisServer::start();
    let instance = |pki: &TestPki| {
        let config = ServerConfig {
            interval: Duration::from_millis(5),
            ..tls_server_config(pki, false)
        };
        let url = redis.url();
        async move {
            let store = RedisStore::connect(&url, DEFAULT_PREFIX)
                .await
                .expect("connect to the test redis-server");
            TestServer::start_with_store(config, Arc::new(store)).await
        }
    };
    let first = instance(&pki).await;
    let second = instance(&pki).await;
    let (first_port, second_port) = (first.port(), second.port());
    let config = client(
        vec![first_port, second_port],
        400,
        Some(client_tls(&pki, None)),
    );
    let (events_in, mut events_out) = tokio::sync::mpsc::unbounded_channel();
    let run = tokio::spawn(async move {
        let mut observer = Forward(events_in);
        numstream_client::run(config, &mut observer).await
    });
    // Once numbers flow from the first instance, it drains: the client
    // must go on on the second, over TLS, with the same session.
    let mut numbers = 0;
    while numbers < 50 {
        match tokio::time::timeout(RUN_LIMIT, events_out.recv()).await {
            Ok(Some(Event::Number { .. })) => numbers += 1,
            Ok(Some(_)) => {}
            other => panic!("the client stopped before streaming: {other:?}"),
        }
    }
    first.shutdown().await;
    let report = tokio::time::timeout(RUN_LIMIT, run)
        .await
        .expect("the client run must end")
        .expect("client task");
    assert_undisturbed(&report);
    assert!(report.reconnects >= 1, "{}", report.render_human());
    drop(second);
}

struct Forward(tokio::sync::mpsc::UnboundedSender<Event>);

impl numstream_client::Observer for Forward {
    fn event(&mut self, event: &Event) {
        let _ = self.0.send(event.clone());
    }
}

/// Waits until the server's log says `what` (bounded: past [`RUN_LIMIT`]
/// the test fails with the log).
async fn logged(server: &ServerProcess, what: &str) {
    let looking_for = format!("{what:?} in the log");
    wait::until_value(
        RUN_LIMIT,
        &looking_for,
        || std::future::ready(server.log()),
        |log| log.contains(what),
    )
    .await;
}

/// SIGHUP: a connection made before keeps streaming to the end; a new one
/// is served the new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    let old = TestPki::generate();
    let new = TestPki::generate();
    let cert = old.dir().join("live.pem");
    let key = old.dir().join("live.key");
    std::fs::copy(&old.server.cert, &cert).expect("copy");
    std::fs::copy(&old.server.key, &key).expect("copy");
    let args = [
        "--interval",
        "10ms",
        "--seed",
        "42",
        "--tls-cert",
        cert.to_str().expect("utf-8 path"),
        "--tls-key",
        key.to_str().expect("utf-8 path"),
    ];
    let server = ServerCommand::new(BIN)
        .args(args)
        .start()
        .await
        .expect("start numstream-server");
    let addr = server.addr();
    assert_eq!(
        peer_certificate(addr, &old.ca).await.expect("handshake"),
        old.server.der
    );

    // A session of about 3 s, started before the reload.
    let config = client(vec![server.port()], 300, Some(client_tls(&old, None)));
    let (events_in, mut events_out) = tokio::sync::mpsc::unbounded_channel();
    let streaming =
        tokio::spawn(async move { numstream_client::run(config, &mut Forward(events_in)).await });
    loop {
        match tokio::time::timeout(RUN_LIMIT, events_out.recv()).await {
            Ok(Some(Event::Number { .. })) => break,
            Ok(Some(_)) => {}
            other => panic!("the session did not start: {other:?}"),
        }
    }

    std::fs::copy(&new.server.cert, &cert).expect("replace the certificate");
    std::fs::copy(&new.server.key, &key).expect("replace the key");
    server.signal(Signal::HUP).expect("SIGHUP the server");
    logged(&server, "TLS certificate and key reloaded").await;
    assert_eq!(
        peer_certificate(addr, &new.ca)
            .await
            .expect("handshake after the reload"),
        new.server.der,
        "a new connection must get the new certificate"
    );

    let report = tokio::time::timeout(RUN_LIMIT, streaming)
        .await
        .expect("the session must end")
        .expect("client task");
    assert_undisturbed(&report);
    assert_eq!(
        report.reconnects, 0,
        "the reload must not drop the connection"
    );

    // A broken file on the next SIGHUP keeps the current certificate.
    std::fs::write(&cert, "not a certificate").expect("break the file");
    server.signal(Signal::HUP).expect("SIGHUP the server");
    logged(&server, "TLS reload failed").await;
    assert_eq!(
        peer_certificate(addr, &new.ca)
            .await
            .expect("still serving"),
        new.server.der
    );
    server.signal(Signal::TERM).expect("SIGTERM the server");
}

/// Server TLS from `certificate`, with mutual TLS (client certificates
/// chained to the PKI's client CA) when `mutual`.
fn server_tls(pki: &TestPki, certificate: &CertFiles, mutual: bool) -> Arc<ServerTls> {
    let client_ca = mutual.then_some(pki.client_ca.as_path());
    numstream_server::testing::tls(&certificate.cert, &certificate.key, client_ca)
}

/// Client TLS trusting the PKI's CA, presenting `identity` if given.
fn client_tls(pki: &TestPki, identity: Option<&CertFiles>) -> ClientTls {
    ClientTls::new(&TlsOptions {
        ca: Some(pki.ca.clone()),
        server_name: None,
        client_cert: identity.map(|files| files.cert.clone()),
        client_key: identity.map(|files| files.key.clone()),
    })
    .expect("the generated CA loads")
}

/// Closes the connection once `bytes` came down from the server.
fn close_downstream(bytes: usize) -> ConnectionPlan {
    ConnectionPlan::close_after(Direction::Downstream, bytes as u64)
}
