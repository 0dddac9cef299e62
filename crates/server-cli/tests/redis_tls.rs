//! The Redis store over TLS (`rediss://`): a real `redis-server` serving
//! only TLS with a certificate made at run time, trusted by the server
//! through `SSL_CERT_FILE`; sessions open, stream and complete through it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use numstream_client::ClientConfig;
use numstream_harness::process::ServerCommand;
use numstream_harness::redis::free_port;
use numstream_harness::tls::TestPki;

const BIN: &str = env!("CARGO_BIN_EXE_numstream-server");

/// A redis-server that listens only for TLS; killed on drop.
struct TlsRedis(Child);

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_tls_redis(pki: &TestPki, port: u16) -> TlsRedis {
    let path = |path: &std::path::Path| path.to_str().expect("utf-8 path").to_owned();
    let child = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .args(["--tls-cert-file", &path(&pki.server.cert)])
        .args(["--tls-key-file", &path(&pki.server.key)])
        .args(["--tls-ca-cert-file", &path(&pki.ca)])
        .args([
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--bind", "127.0.0.1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (the Redis tests need it)");
    let redis = TlsRedis(child);
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "redis-server did not listen for TLS on {port}"
        );
        std::thread::sleep(Duration::from_millis(20)); // poll step: waiting (bounded) for redis-server to listen
    }
    redis
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_live_in_a_redis_reached_over_tls() {
    let pki = TestPki::generate();
    let redis_port = free_port();
    let _redis = start_tls_redis(&pki, redis_port);
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
