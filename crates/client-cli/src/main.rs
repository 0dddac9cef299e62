//! `numstream-client`: fetches one numstream session, resuming across
//! dropped connections, and verifies its checksum.
//!
//! The report goes to stdout (aligned text, or one JSON object with
//! `--json`); logs and the progress bar go to stderr.
//!
//! Exit codes (also `numstream_client::EXIT_*`):
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | the sequence arrived complete and the checksums match |
//! | 1 | checksum mismatch |
//! | 2 | usage error (bad flag or value) |
//! | 3 | session rejected or expired: any final error from the server |
//! | 4 | no WELCOME within `--open-timeout`, or gave up reconnecting within the session TTL (also: the async runtime could not start) |
//! | 5 | protocol violation by the server |
//! | 6 | TLS failed for good (no TLS on the port, untrusted, expired or misnamed certificate, client certificate refused) |

mod cli;
mod progress;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use numstream_client::{
    ClientConfig, ClientTls, EXIT_CANNOT_CONNECT, EXIT_USAGE, Report, TlsOptions,
};
use tracing_subscriber::EnvFilter;

use crate::cli::Cli;
use crate::progress::{LogWriter, ProgressObserver};

fn main() -> ExitCode {
    // Exits with 2 and clap's message on a usage error. `--generate -1`
    // must meet the list of accepted values, like every other flag's bad
    // value (see cli.rs), not "unexpected argument".
    let matches = numstream_cli_support::with_generate(Cli::command())
        .mut_arg(numstream_cli_support::GENERATE, |arg| {
            arg.allow_hyphen_values(true)
        })
        .get_matches();
    numstream_cli_support::generate_if_asked(&matches, Cli::command());
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    // The files are read now: a missing or broken one is a usage error,
    // not a connection failure retried until the open timeout.
    let tls = match cli.tls.then(|| ClientTls::new(&tls_options(&cli))) {
        None => None,
        Some(Ok(tls)) => Some(tls),
        Some(Err(error)) => {
            eprintln!("numstream-client: cannot set up TLS: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match real_main(cli, tls) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("numstream-client: {error:#}");
            ExitCode::from(EXIT_CANNOT_CONNECT)
        }
    }
}

fn tls_options(cli: &Cli) -> TlsOptions {
    TlsOptions {
        ca: cli.tls_ca.clone(),
        server_name: cli.tls_server_name.clone(),
        client_cert: cli.tls_client_cert.clone(),
        client_key: cli.tls_client_key.clone(),
    }
}

fn real_main(cli: Cli, tls: Option<ClientTls>) -> anyhow::Result<u8> {
    let count = cli.count.unwrap_or_else(|| {
        rand::random_range(numstream_protocol::MIN_COUNT..=numstream_protocol::MAX_COUNT)
    });
    let config = ClientConfig {
        host: cli.host,
        ports: cli.ports,
        count,
        client_id: cli.client_id.unwrap_or_else(uuid::Uuid::new_v4),
        open_timeout: cli.open_timeout,
        tls,
        max_duration: cli.max_duration,
        ..ClientConfig::default()
    };

    // The bar is for people watching a terminal; scripts and logs get
    // nothing on stderr but log lines.
    let bar = (std::io::stderr().is_terminal() && !cli.quiet).then(|| progress::bar(count));
    init_logging(
        cli.verbose,
        numstream_cli_support::stderr_wants_colour(),
        bar.clone(),
    );

    // One connection at a time: a single-threaded runtime is plenty.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut observer = ProgressObserver::new(bar);
    let report = runtime.block_on(numstream_client::run(config, &mut observer));
    print_report(&report, cli.json);
    Ok(report.exit_code())
}

fn init_logging(verbose: bool, ansi: bool, bar: Option<indicatif::ProgressBar>) {
    // RUST_LOG wins when set, so an operator can always dig deeper.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(if verbose { "info" } else { "warn" }));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogWriter::new(bar))
        .with_ansi(ansi)
        .init();
}

fn print_report(report: &Report, json: bool) {
    let text = if json {
        format!("{}\n", report.to_json())
    } else {
        report.render_human()
    };
    // A closed stdout (`| head -0`) must not turn a verified run into a
    // panic; the exit code still tells the outcome.
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        tracing::warn!(%error, "cannot write the report to stdout");
    }
}
