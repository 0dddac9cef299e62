//! The Redis password never leaks: not in an error about a bad URL (from
//! `--store`, `NUMSTREAM_STORE` or `--store-file`), not in the command line
//! when given by the environment or a file, not in the log at trace level,
//! not in `/metrics`; and clients are told `store unavailable`, never
//! Redis's own words.

use std::process::{Command, Stdio};
use std::time::Duration;

use numstream_client::{ClientConfig, ClientError, Event};
use numstream_harness::process::{ServerCommand, ServerProcess};
use numstream_harness::redis::RedisServer;

const BIN: &str = env!("CARGO_BIN_EXE_numstream-server");
const SECRET: &str = "Sup3r-s3cret-PW";

/// Runs the server with `args` and `env` until it exits (bad input makes
/// it exit at once), and returns stdout and stderr together.
fn output_of(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new(BIN)
        .args(args)
        .env_remove("NUMSTREAM_STORE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run numstream-server");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

#[test]
fn a_bad_store_url_is_refused_without_showing_its_password() {
    let dir = std::env::temp_dir().join(format!("numstream-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("store-url");
    let file_arg = file.to_str().expect("utf-8 path").to_owned();
    for bad in [
        format!("redis://:{SECRET}@127.0.0.1:notaport/0"),
        format!("redis://user:{SECRET}@127.0.0.1:6379/notadb"),
        format!("rediss://:{SECRET}@127.0.0.1:6379/0#insecure"),
        format!("postgres://:{SECRET}@db/0"),
        format!("redis//:{SECRET}@oops"),
    ] {
        std::fs::write(&file, &bad).expect("write the URL file");
        for (source, args, env) in [
            ("--store", vec!["--port", "7000", "--store", &bad], vec![]),
            (
                "NUMSTREAM_STORE",
                vec!["--port", "7000"],
                vec![("NUMSTREAM_STORE", bad.as_str())],
            ),
            (
                "--store-file",
                vec!["--port", "7000", "--store-file", &file_arg],
                vec![],
            ),
        ] {
            let (code, text) = output_of(&args, &env);
            assert_eq!(code, Some(2), "{source} {bad}: {text}");
            assert!(
                !text.contains(SECRET),
                "{source} leaked the password: {text}"
            );
            assert!(
                text.contains(source),
                "{source}: the error must name it: {text}"
            );
        }
    }
    // Help and version never show the environment's URL either.
    let env = format!("redis://:{SECRET}@127.0.0.1:6379/0");
    for flag in ["--help", "-h", "--version"] {
        let (code, text) = output_of(&[flag], &[("NUMSTREAM_STORE", &env)]);
        assert_eq!(code, Some(0), "{flag}: {text}");
        assert!(!text.contains(SECRET), "{flag}: {text}");
    }
    std::fs::remove_dir_all(&dir).expect("clean up");
}

/// Sets the Redis password (the test Redis starts without one).
async fn require_password(redis: &RedisServer, password: &str) {
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test redis");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(password)
        .query_async(&mut connection)
        .await
        .expect("CONFIG SET requirepass");
}

fn cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).expect("read /proc/PID/cmdline");
    String::from_utf8_lossy(&raw).replace('\0', " ")
}

async fn metrics(server: &ServerProcess) -> String {
    let (status, body) = numstream_harness::http::get(
        server
            .status_address()
            .expect("started with --metrics-addr"),
        "/metrics",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

fn client(port: u16, count: u16, open_timeout: Duration) -> ClientConfig {
    ClientConfig {
        ports: vec![port],
        count,
        open_timeout,
        ..ClientConfig::default()
    }
}

/// With the password right, sessions work and it appears nowhere: not in
/// `/proc/PID/cmdline`, the trace-level log or `/metrics`. With it wrong,
/// clients are told `store unavailable`, and Redis's words stay in the
/// server's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_from_the_environment_or_a_file_appears_nowhere() {
    let redis = RedisServer::start();
    require_password(&redis, SECRET).await;
    let url = format!("redis://:{SECRET}@127.0.0.1:{}/0", redis.port());
    let dir = std::env::temp_dir().join(format!("numstream-secret-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("store-url");
    std::fs::write(&file, format!("{url}\n")).expect("write the URL file");
    let file_arg = file.to_str().expect("utf-8 path").to_owned();
    let common = ["--metrics-addr", "127.0.0.1:0", "--interval", "1ms"];
    let by_env: Vec<&str> = common.to_vec();
    let by_file: Vec<&str> = common
        .iter()
        .copied()
        .chain(["--store-file", file_arg.as_str()])
        .collect();
    for (source, args, env) in [
        (
            "NUMSTREAM_STORE",
            by_env,
            vec![("NUMSTREAM_STORE", url.as_str()), ("RUST_LOG", "trace")],
        ),
        ("--store-file", by_file, vec![("RUST_LOG", "trace")]),
    ] {
        let mut command = ServerCommand::new(BIN).args(&args);
        for (key, value) in env {
            command = command.env(key, value);
        }
        let server = command.start().await.expect("start numstream-server");
        // A bound, not a measure: a loaded machine is slow to connect.
        let config = client(server.port(), 50, Duration::from_secs(60));
        let report = numstream_client::run(config, &mut ()).await;
        assert!(
            report.ok,
            "{source}: {}\n{}",
            report.render_human(),
            server.log()
        );
        let metrics = metrics(&server).await;
        assert!(
            metrics.contains("numstream_sessions_completed_total"),
            "{metrics}"
        );
        for (what, text) in [
            (
                "the command line",
                cmdline(server.pid().expect("the server runs")),
            ),
            ("the log", server.log()),
            ("/metrics", metrics),
        ] {
            assert!(
                !text.contains(SECRET),
                "{source}: the password is in {what}: {text}"
            );
        }
        assert!(
            server.log().contains("redis://***@127.0.0.1"),
            "{source}: the log shows the store redacted:\n{}",
            server.log()
        );
    }

    // The wrong password: Redis says WRONGPASS; the client hears only
    // `store unavailable`.
    let wrong = format!("redis://:not-{SECRET}@127.0.0.1:{}/0", redis.port());
    let server = ServerCommand::new(BIN)
        .env("NUMSTREAM_STORE", &wrong)
        .start()
        .await
        .expect("start numstream-server");
    let mut events: Vec<Event> = Vec::new();
    let config = client(server.port(), 5, Duration::from_secs(3));
    let report = numstream_client::run(config, &mut events).await;
    assert!(
        matches!(report.error, Some(ClientError::CannotConnect { .. })),
        "{}",
        report.render_human()
    );
    let causes: Vec<&String> = events
        .iter()
        .filter_map(|event| match event {
            Event::Reconnecting { cause, .. } => Some(cause),
            _ => None,
        })
        .collect();
    assert!(
        causes
            .iter()
            .any(|cause| cause.contains("store_unavailable (12): store unavailable")),
        "{causes:?}"
    );
    for cause in &causes {
        for detail in ["WRONGPASS", "AUTH", "redis", "Redis"] {
            assert!(
                !cause.contains(detail),
                "{detail} told to the client: {cause}"
            );
        }
    }
    let log = server.log();
    assert!(log.contains("session store unavailable"), "{log}");
    assert!(!log.contains(SECRET), "{log}");
    std::fs::remove_dir_all(&dir).expect("clean up");
}
