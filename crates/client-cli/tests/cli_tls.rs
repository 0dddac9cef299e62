//! `numstream-client --tls` as a user runs it, against real TLS servers
//! with certificates made at run time: a session that verifies, and every
//! mismatch ending the process at once with the cause on its summary line
//! and exit 6 (3 for a plaintext client, which the server refuses).

use std::ffi::OsString;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use numstream_harness::process::output_within;
use numstream_harness::tls::{CertFiles, TestPki};
use numstream_server::testing::{TestServer, fast_config};
use numstream_server::{ServerConfig, ServerTls};

/// A mismatch that were retried would run the whole default 60 s open
/// timeout; past this, the run is killed and the test fails.
const LIMIT: Duration = Duration::from_secs(30);

/// Runs the client with `roots` as the platform's trusted roots.
fn run_client(args: Vec<OsString>, roots: &std::path::Path) -> Output {
    output_within(
        Command::new(env!("CARGO_BIN_EXE_numstream-client"))
            .args(&args)
            .env_remove("RUST_LOG")
            .env("SSL_CERT_FILE", roots)
            .env_remove("SSL_CERT_DIR"),
        LIMIT,
    )
}

/// The client, trusting (unless given --tls-ca) only a CA that signed
/// none of the servers' certificates.
async fn client(pki: &TestPki, args: Vec<OsString>) -> Output {
    let roots = pki.client_ca.clone();
    tokio::task::spawn_blocking(move || run_client(args, &roots))
        .await
        .expect("client process")
}

fn args(port: u16, extra: &[&std::ffi::OsStr]) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["--port", &port.to_string(), "--count", "10", "--quiet"]
        .iter()
        .map(OsString::from)
        .collect();
    args.extend(extra.iter().map(|arg| arg.to_os_string()));
    args
}

async fn tls_server(pki: &TestPki, certificate: &CertFiles) -> TestServer {
    TestServer::start(ServerConfig {
        tls: Some(server_tls(pki, certificate, false)),
        ..fast_config()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_verify_and_every_mismatch_exits_at_once_with_its_cause() {
    let pki = TestPki::generate();
    let server = tls_server(&pki, &pki.server).await;
    let plain = TestServer::start(fast_config()).await;
    let expired = tls_server(&pki, &pki.expired).await;
    let misnamed = tls_server(&pki, &pki.wrong_name).await;
    let ca = pki.ca.as_os_str();
    let tls = std::ffi::OsStr::new("--tls");
    let tls_ca = std::ffi::OsStr::new("--tls-ca");

    let ok = client(&pki, args(server.port(), &[tls, tls_ca, ca])).await;
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(stdout.contains("result           OK"), "{stdout}");

    let name = std::ffi::OsStr::new("--tls-server-name");
    let localhost = std::ffi::OsStr::new("localhost");
    let elsewhere = std::ffi::OsStr::new("elsewhere.invalid");
    let cases: Vec<(&str, Vec<OsString>, i32, &str)> = vec![
        (
            "a plaintext client against a TLS server",
            args(server.port(), &[]),
            3,
            "speaks numstream over TLS only",
        ),
        (
            "a TLS client against a plaintext server",
            args(plain.port(), &[tls, tls_ca, ca]),
            6,
            "answered in plaintext, not TLS",
        ),
        (
            "a certificate from a CA the platform does not trust",
            args(server.port(), &[tls]),
            6,
            "not signed by a trusted CA",
        ),
        (
            "an expired certificate",
            args(expired.port(), &[tls, tls_ca, ca]),
            6,
            "certificate has expired",
        ),
        (
            "a certificate for another name",
            args(misnamed.port(), &[tls, tls_ca, ca, name, localhost]),
            6,
            "not valid for the name localhost",
        ),
        (
            "--tls-server-name not on the certificate",
            args(server.port(), &[tls, tls_ca, ca, name, elsewhere]),
            6,
            "not valid for the name elsewhere.invalid",
        ),
    ];
    for (case, args, code, cause) in cases {
        let out = client(&pki, args).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(code), "{case}: {stdout}");
        let result = stdout
            .lines()
            .find(|line| line.starts_with("result"))
            .unwrap_or_default();
        assert!(result.contains("FAILED"), "{case}: {stdout}");
        assert!(result.contains(cause), "{case}: {result}");
        assert!(stdout.contains("received         0"), "{case}: {stdout}");
    }
}

/// Server TLS from `certificate`, with mutual TLS (client certificates
/// chained to the PKI's client CA) when `mutual`.
fn server_tls(pki: &TestPki, certificate: &CertFiles, mutual: bool) -> Arc<ServerTls> {
    let client_ca = mutual.then_some(pki.client_ca.as_path());
    numstream_server::testing::tls(&certificate.cert, &certificate.key, client_ca)
}
