//! The Redis store over TLS (`rediss://`): a real `redis-server` serving
//! TLS with a certificate made at run time, trusted by the server through
//! `SSL_CERT_FILE`, and the server given only its TLS port; sessions open,
//! stream and complete through it.

use std::time::Duration;

use numstream_client::ClientConfig;
use numstream_harness::process::ServerCommand;
use numstream_harness::redis::RedisServer;
use numstream_harness::tls::TestPki;

const BIN: &str = env!("CARGO_BIN_EXE_numstream-server");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_live_in_a_redis_reached_over_tls() {
    let pki = TestPki::generate();
    let redis = RedisServer::start_tls(&pki);
    let redis_port = redis.tls_port().expect("a TLS port");
    let url = format!("rediss://localhost:{redis_port}/0");
    let ca = pki.ca.to_str().expect("utf-8 path").to_owned();
    let server = ServerCommand::new(BIN)
        .args(["--interval", "1ms"])
        .env("NUMSTREAM_STORE", &url)
        .env("SSL_CERT_FILE", &ca)
        .start()
        .await
        .expect("start numstream-server");
    let config = ClientConfig {
        ports: vec![server.port()],
        count: 100,
        // Generous: a loaded machine makes the first TLS round trips to
        // Redis slow; this bounds the run, it measures nothing.
        open_timeout: Duration::from_secs(60),
        ..ClientConfig::default()
    };
    let report = numstream_client::run(config, &mut ()).await;
    assert!(report.ok, "{}\n{}", report.render_human(), server.log());
    let log = server.log();
    assert!(log.contains("store=rediss://localhost"), "{log}");

    // Not trusting the CA, the same server cannot use that Redis: it
    // starts, and answers store_unavailable.
    let untrusting = ServerCommand::new(BIN)
        .env("NUMSTREAM_STORE", &url)
        .env("SSL_CERT_FILE", &pki.client_ca)
        .start()
        .await
        .expect("start numstream-server");
    let config = ClientConfig {
        ports: vec![untrusting.port()],
        count: 5,
        open_timeout: Duration::from_secs(3),
        ..ClientConfig::default()
    };
    let mut events: Vec<numstream_client::Event> = Vec::new();
    let report = numstream_client::run(config, &mut events).await;
    assert!(!report.ok);
    let told_unavailable = events.iter().any(|event| {
        matches!(event, numstream_client::Event::Reconnecting { cause, .. }
            if cause.contains("store_unavailable") && cause.contains("store unavailable"))
    });
    let log = untrusting.log();
    assert!(told_unavailable, "{events:?}\n{log}");
    assert!(
        log.contains("UnknownIssuer"),
        "the reason is in the server's log: {log}"
    );
}
