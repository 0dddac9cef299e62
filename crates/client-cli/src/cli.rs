//! The command line: flags, their validation and their help text.
//!
//! Every value is checked here, so a bad one is a usage error (exit 2)
//! naming what is accepted, never a panic or a failure deep in a run.
//! Value-taking flags accept values starting with `-`, so that `--count
//! -1` reaches the range check instead of being mistaken for a flag.

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use numstream_cli_support::values::{duration_in, integer_in};

const EXAMPLES: &str = "\
Examples:
  numstream-client --port 7000
  numstream-client --port 7000 --count 20
  numstream-client --host 10.0.0.5 --port 7000 --port 7001 --count 65535
  numstream-client --port 7000 --client-id 5f0c5e1a-8d3c-4c2e-9b1a-2f3e4d5c6b7a --json
  numstream-client --host stream.example.com --port 7000 --tls
  numstream-client --port 7000 --tls --tls-ca ca.pem --tls-server-name localhost
  RUST_LOG=numstream_client=debug numstream-client --port 7000 --quiet
  numstream-client --generate man > numstream-client.1

Exit codes:
  0  the sequence arrived complete and the checksums match
  1  checksum mismatch
  2  usage error
  3  session rejected or expired (any final error from the server)
  4  no WELCOME within --open-timeout, or gave up reconnecting within the
     session TTL
  5  protocol violation by the server
  6  TLS failed for good: no TLS on the server's port, an untrusted, expired
     or misnamed server certificate, or our client certificate refused";

/// Fetch a stream of numbers from a numstream server, resuming across
/// dropped connections, and verify its checksum.
///
/// Prints a report on stdout (aligned text, or one JSON object with
/// --json); the exit code says whether the sequence verified.
#[derive(Debug, Parser)]
#[command(name = "numstream-client", version, after_help = EXAMPLES)]
pub(crate) struct Cli {
    /// Server port; required, repeat it to list several server instances
    ///
    /// The first connection goes to the first port; after a dropped or
    /// failed connection the client moves to the next one, wrapping around.
    ///
    /// Example: --port 7000 --port 7001
    #[arg(long = "port", value_name = "PORT", required = true,
          value_parser = parse_port, allow_hyphen_values = true)]
    pub(crate) ports: Vec<u16>,

    /// Host name or IP address of the server(s)
    ///
    /// A host name is 1 to 253 letters, digits, '-', '_' and '.'; an IPv6
    /// address may be given with or without brackets.
    ///
    /// Example: --host 10.0.0.5
    #[arg(long, value_name = "HOST", default_value = "127.0.0.1",
          value_parser = parse_host, allow_hyphen_values = true)]
    pub(crate) host: String,

    /// How many numbers to request, 1 to 65535 [default: random in
    /// 1..=65535]
    ///
    /// Example: --count 20
    #[arg(long, value_name = "N", value_parser = parse_count, allow_hyphen_values = true)]
    pub(crate) count: Option<u16>,

    /// The client's identity, a UUID [default: a random v4 UUID]
    ///
    /// The server allows one live session per client id, so reusing an id
    /// while its session lives is refused (session_exists). The nil UUID
    /// (all 0) and the max UUID (all f) are reserved by the protocol.
    ///
    /// Example: --client-id 5f0c5e1a-8d3c-4c2e-9b1a-2f3e4d5c6b7a
    #[arg(long, value_name = "UUID", value_parser = parse_client_id,
          allow_hyphen_values = true)]
    pub(crate) client_id: Option<uuid::Uuid>,

    /// How long to keep trying to open the session, 1s to 24h
    ///
    /// Until a server welcomes the session, every refusal that says "retry"
    /// (server_busy, store_unavailable, shutting_down while draining) and
    /// every failed connection is retried, with jittered backoff capped at
    /// 5 s (20 s after server_busy), however many attempts that takes; the run gives up (exit 4)
    /// within this time (no attempt starts in its last second, or last
    /// tenth if shorter: it could not be answered in time). The default is
    /// twice the server's default 30 s session TTL: a server at its
    /// session cap may refuse new sessions until the sessions holding it
    /// expire, which can take a whole TTL. Once the session is open, the
    /// client instead gives up resuming when the TTL announced by the
    /// server has passed since the connection dropped.
    ///
    /// Example: --open-timeout 5m
    #[arg(long, value_name = "DURATION", default_value = "60s",
          value_parser = parse_open_timeout, allow_hyphen_values = true)]
    pub(crate) open_timeout: Duration,

    /// Print the report as one JSON object on stdout, and nothing else on
    /// stdout [default: aligned text]
    ///
    /// Keys: client_id, count, received, sum, server_checksum,
    /// client_checksum, reconnects, ok, error. Checksums are "0x%08x"
    /// strings; server_checksum and error are null when absent. The
    /// schema is docs/client-report.schema.json; keys are only ever added.
    ///
    /// Example: --json
    #[arg(long)]
    pub(crate) json: bool,

    /// Do not draw the progress bar [default: off]
    ///
    /// The bar is drawn on stderr, and only when stderr is a terminal: it
    /// shows numbers received out of the total, the rate, the time left,
    /// the reconnects so far and the server in use (or the next retry).
    ///
    /// Example: --quiet
    #[arg(long, short)]
    pub(crate) quiet: bool,

    /// Log each reconnect, with its cause and delay, to stderr [default:
    /// off, only warnings are logged]
    ///
    /// RUST_LOG, when set, takes precedence (e.g.
    /// RUST_LOG=numstream_client=debug also logs connects and WELCOMEs).
    ///
    /// Example: --verbose
    #[arg(long, short)]
    pub(crate) verbose: bool,

    /// Connect over TLS (ALPN numstream/1, TLS 1.3) [default: plain TCP]
    ///
    /// The server's certificate must chain to the platform's trusted roots
    /// (or --tls-ca) and name --host (or --tls-server-name). A mismatch
    /// (no TLS on the port, an untrusted, expired or misnamed certificate,
    /// a refused client certificate) fails at once with exit 6 and the
    /// reason, without retrying.
    ///
    /// Example: --tls
    #[arg(long)]
    pub(crate) tls: bool,

    /// Trust the CA certificates in this PEM file instead of the
    /// platform's roots [default: the platform's roots]
    ///
    /// Example: --tls-ca /etc/numstream/ca.pem
    #[arg(long, value_name = "PATH", requires = "tls")]
    pub(crate) tls_ca: Option<PathBuf>,

    /// The name the server's certificate must carry [default: --host]
    ///
    /// Example: --tls-server-name stream.example.com
    #[arg(
        long,
        value_name = "NAME",
        requires = "tls",
        allow_hyphen_values = true
    )]
    pub(crate) tls_server_name: Option<String>,

    /// Present this PEM certificate chain to the server (mutual TLS)
    /// [default: none]
    ///
    /// Requires --tls-client-key.
    ///
    /// Example: --tls-client-cert client.pem
    #[arg(long, value_name = "PATH", requires_all = ["tls", "tls_client_key"])]
    pub(crate) tls_client_cert: Option<PathBuf>,

    /// The PEM private key of --tls-client-cert
    ///
    /// Example: --tls-client-key client.key
    #[arg(long, value_name = "PATH", requires_all = ["tls", "tls_client_cert"])]
    pub(crate) tls_client_key: Option<PathBuf>,

    /// Give up (exit 4) when the whole run has taken this long, 1s to
    /// 100000h [default: no bound beyond --open-timeout and the session
    /// TTL]
    ///
    /// Bounds the run whatever the server announces or does: its interval
    /// is believed up to 1h and its session TTL up to 1h, and this caps
    /// the total.
    ///
    /// Example: --max-duration 2h
    #[arg(long, value_name = "DURATION", value_parser = parse_max_duration,
          allow_hyphen_values = true)]
    pub(crate) max_duration: Option<Duration>,
}

/// The open timeout's accepted range: under a second is less than one
/// handshake takes on a loaded server, and past a day nobody is waiting
/// for the answer any more.
const OPEN_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(24 * 3600);

/// `--max-duration`'s accepted range: at least a second, at most what a
/// session of 65,535 numbers at the longest interval could need.
const MAX_DURATION_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(100_000 * 3600);

fn parse_max_duration(text: &str) -> Result<Duration, String> {
    duration_in(
        *MAX_DURATION_RANGE.start(),
        *MAX_DURATION_RANGE.end(),
        "1s and 100000h",
    )(text)
}

fn parse_port(text: &str) -> Result<u16, String> {
    integer_in(1, u16::MAX)(text)
}

fn parse_count(text: &str) -> Result<u16, String> {
    integer_in(numstream_protocol::MIN_COUNT, numstream_protocol::MAX_COUNT)(text)
}

/// An IP address (an IPv6 one with or without brackets) or a host name
/// that could resolve: anything else cannot name a server, and would only
/// fail later as a "cannot connect" retried until the open timeout.
fn parse_host(text: &str) -> Result<String, String> {
    let host = text.trim();
    let unbracketed = host
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .filter(|inner| inner.parse::<std::net::Ipv6Addr>().is_ok());
    if let Some(v6) = unbracketed {
        return Ok(v6.to_owned());
    }
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(host.to_owned());
    }
    let name_chars = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let labels_fit = host
        .strip_suffix('.')
        .unwrap_or(host)
        .split('.')
        .all(|label| (1..=63).contains(&label.len()) && !label.starts_with('-'));
    if (1..=253).contains(&host.len()) && host.chars().all(name_chars) && labels_fit {
        return Ok(host.to_owned());
    }
    Err(format!(
        "host must be an IP address or a host name of 1 to 253 letters, digits, '-', '_' \
         and '.' (labels of 1 to 63, not starting with '-') (got {text:?})"
    ))
}

fn parse_client_id(text: &str) -> Result<uuid::Uuid, String> {
    let id = uuid::Uuid::parse_str(text.trim()).map_err(|error| {
        format!("client id must be a UUID such as 5f0c5e1a-8d3c-4c2e-9b1a-2f3e4d5c6b7a ({error})")
    })?;
    if id.is_nil() || id.is_max() {
        return Err(format!(
            "client id must not be the nil or max UUID (reserved by the protocol; got {text:?})"
        ));
    }
    Ok(id)
}

fn parse_open_timeout(text: &str) -> Result<Duration, String> {
    duration_in(
        *OPEN_TIMEOUT_RANGE.start(),
        *OPEN_TIMEOUT_RANGE.end(),
        "1s and 24h",
    )(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn count_accepts_exactly_1_to_65535() {
        assert_eq!(parse_count("1"), Ok(1));
        assert_eq!(parse_count("65535"), Ok(65535));
        for bad in ["0", "65536", "70000", "-1", "abc", "", "1.5"] {
            let error = parse_count(bad).expect_err(bad);
            assert!(error.contains("must be between 1 and 65535"), "{error}");
        }
    }

    #[test]
    fn port_accepts_exactly_1_to_65535() {
        assert_eq!(parse_port("1"), Ok(1));
        assert_eq!(parse_port(" 65535 "), Ok(65535));
        for bad in ["0", "65536", "-1", "18446744073709551615", "1e3", "", "x"] {
            let error = parse_port(bad).expect_err(bad);
            assert!(error.contains("must be between 1 and 65535"), "{error}");
        }
    }

    #[test]
    fn host_accepts_addresses_and_names_only() {
        for (good, parsed) in [
            ("127.0.0.1", "127.0.0.1"),
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("localhost", "localhost"),
            ("db-1.internal.example.com.", "db-1.internal.example.com."),
            ("my_service", "my_service"),
        ] {
            assert_eq!(parse_host(good).as_deref(), Ok(parsed), "{good}");
        }
        let long_label = "a".repeat(64);
        let long_name = ["abc"; 64].join(".");
        for bad in [
            "",
            " ",
            "a b",
            "10.0.0.5:7000",
            "[10.0.0.5]",
            "host/path",
            "-leading",
            "a..b",
            long_label.as_str(),
            long_name.as_str(),
            "\u{0}",
        ] {
            let error = parse_host(bad).expect_err(bad);
            assert!(error.contains("1 to 253"), "{error}");
        }
    }

    #[test]
    fn client_id_must_be_a_usable_uuid() {
        let id = "5f0c5e1a-8d3c-4c2e-9b1a-2f3e4d5c6b7a";
        assert_eq!(
            parse_client_id(id).map(|u| u.to_string()),
            Ok(id.to_owned())
        );
        let error = parse_client_id("nope").expect_err("not a uuid");
        assert!(error.contains("must be a UUID"), "{error}");
        for reserved in [
            "00000000-0000-0000-0000-000000000000",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
        ] {
            let error = parse_client_id(reserved).expect_err(reserved);
            assert!(error.contains("nil or max UUID"), "{error}");
        }
    }

    #[test]
    fn open_timeout_accepts_exactly_its_range() {
        let (min, max) = (*OPEN_TIMEOUT_RANGE.start(), *OPEN_TIMEOUT_RANGE.end());
        // The message and help spell the range out; they must match it.
        assert_eq!(parse_open_timeout("1s"), Ok(min));
        assert_eq!(parse_open_timeout("24h"), Ok(max));
        assert_eq!(parse_open_timeout("90s"), Ok(Duration::from_secs(90)));
        for bad in [
            "0s",
            "999ms",
            "24h 1ms",
            "1000000000000000s",
            "99999999999999999999999999s",
            "-5s",
            "5",
            "",
            "soon",
        ] {
            let error = parse_open_timeout(bad).expect_err(bad);
            assert!(error.contains("between 1s and 24h"), "{error}");
        }
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("1s to 24h"), "{help}");
    }

    #[test]
    fn tls_flags_need_tls_and_come_in_pairs() {
        let base = ["numstream-client", "--port", "7000"];
        let parse = |extra: &[&str]| Cli::try_parse_from(base.iter().chain(extra));
        let cli = parse(&["--tls", "--tls-ca", "ca.pem", "--tls-server-name", "x"]).expect("valid");
        assert!(cli.tls);
        assert_eq!(cli.tls_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(cli.tls_server_name.as_deref(), Some("x"));
        for bad in [
            &["--tls-ca", "ca.pem"][..],
            &["--tls-server-name", "x"],
            &["--tls", "--tls-client-cert", "c.pem"],
            &["--tls", "--tls-client-key", "k.pem"],
            &["--tls-client-cert", "c.pem", "--tls-client-key", "k.pem"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(
            parse(&[
                "--tls",
                "--tls-client-cert",
                "c.pem",
                "--tls-client-key",
                "k.pem"
            ])
            .is_ok()
        );
    }

    #[test]
    fn max_duration_accepts_exactly_its_range() {
        assert_eq!(parse_max_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_max_duration("100000h"), Ok(*MAX_DURATION_RANGE.end()));
        for bad in ["0s", "999ms", "100000h 1s", "-1s", "", "forever"] {
            let error = parse_max_duration(bad).expect_err(bad);
            assert!(error.contains("between 1s and 100000h"), "{error}");
        }
    }

    #[test]
    fn ports_repeat_and_defaults_apply() {
        let cli = Cli::try_parse_from(["numstream-client", "--port", "7000", "--port", "7001"])
            .expect("valid");
        assert_eq!(cli.ports, [7000, 7001]);
        assert_eq!(cli.host, "127.0.0.1");
        assert_eq!(cli.count, None);
        assert_eq!(cli.client_id, None);
        assert_eq!(
            cli.open_timeout,
            numstream_client::ClientConfig::default().open_timeout,
            "the flag's default is the library's"
        );
        assert!(!cli.json && !cli.quiet && !cli.verbose && !cli.tls);
        assert_eq!(cli.max_duration, None);
        assert!(
            Cli::try_parse_from(["numstream-client"]).is_err(),
            "--port is required"
        );
        assert!(Cli::try_parse_from(["numstream-client", "--port", "0"]).is_err());
    }

    #[test]
    fn help_documents_every_flag_with_default_and_example() {
        let help = Cli::command().render_long_help().to_string();
        for (flag, example) in [
            ("--port", "Example: --port 7000"),
            ("--host", "Example: --host"),
            ("--count", "Example: --count 20"),
            ("--client-id", "Example: --client-id"),
            ("--open-timeout", "Example: --open-timeout 5m"),
            ("--json", "Example: --json"),
            ("--quiet", "Example: --quiet"),
            ("--verbose", "Example: --verbose"),
            ("--tls", "Example: --tls"),
            ("--tls-ca", "Example: --tls-ca"),
            ("--tls-server-name", "Example: --tls-server-name"),
            ("--tls-client-cert", "Example: --tls-client-cert"),
            ("--tls-client-key", "Example: --tls-client-key"),
            ("--max-duration", "Example: --max-duration 2h"),
        ] {
            assert!(help.contains(flag), "{flag} missing from help");
            assert!(help.contains(example), "{example} missing from help");
        }
        assert!(help.contains("[default: 127.0.0.1]"));
        assert!(help.contains("[default: random"));
        assert!(help.contains("[default: 60s]"));
        assert!(help.contains("Exit codes:"));
    }
}
