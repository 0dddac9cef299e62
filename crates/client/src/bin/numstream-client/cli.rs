//! The command line: flags, their validation and their help text.

use clap::Parser;

const EXAMPLES: &str = "\
Examples:
  numstream-client --port 7000
  numstream-client --port 7000 --count 20
  numstream-client --host 10.0.0.5 --port 7000 --port 7001 --count 65535
  numstream-client --port 7000 --client-id 5f0c5e1a-8d3c-4c2e-9b1a-2f3e4d5c6b7a --json
  RUST_LOG=numstream_client=debug numstream-client --port 7000 --quiet
  numstream-client --generate man > numstream-client.1

Exit codes:
  0  the sequence arrived complete and the checksums match
  1  checksum mismatch
  2  usage error
  3  session rejected or expired (any final error from the server)
  4  cannot connect, or gave up reconnecting within the session TTL
  5  protocol violation by the server";

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
          value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) ports: Vec<u16>,

    /// Host name or IP address of the server(s)
    ///
    /// Example: --host 10.0.0.5
    #[arg(long, value_name = "HOST", default_value = "127.0.0.1")]
    pub(crate) host: String,

    /// How many numbers to request, 1 to 65535 [default: random in
    /// 1..=65535]
    ///
    /// Example: --count 20
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub(crate) count: Option<u16>,

    /// The client's identity, a UUID [default: a random v4 UUID]
    ///
    /// The server allows one live session per client id, so reusing an id
    /// while its session lives is refused (session_exists).
    ///
    /// Example: --client-id 5f0c5e1a-8d3c-4c2e-9b1a-2f3e4d5c6b7a
    #[arg(long, value_name = "UUID", value_parser = parse_client_id)]
    pub(crate) client_id: Option<uuid::Uuid>,

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
}

fn parse_count(text: &str) -> Result<u16, String> {
    let out_of_range = || format!("count must be between 1 and 65535 (got {text:?})");
    let value: u64 = text.trim().parse().map_err(|_| out_of_range())?;
    match u16::try_from(value) {
        Ok(count) if count >= numstream_protocol::MIN_COUNT => Ok(count),
        _ => Err(out_of_range()),
    }
}

fn parse_client_id(text: &str) -> Result<uuid::Uuid, String> {
    uuid::Uuid::parse_str(text.trim()).map_err(|error| {
        format!("client id must be a UUID such as 5f0c5e1a-8d3c-4c2e-9b1a-2f3e4d5c6b7a ({error})")
    })
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
            assert!(
                error.contains("count must be between 1 and 65535"),
                "{error}"
            );
        }
    }

    #[test]
    fn client_id_must_be_a_uuid() {
        let id = "5f0c5e1a-8d3c-4c2e-9b1a-2f3e4d5c6b7a";
        assert_eq!(
            parse_client_id(id).map(|u| u.to_string()),
            Ok(id.to_owned())
        );
        let error = parse_client_id("nope").expect_err("not a uuid");
        assert!(error.contains("must be a UUID"), "{error}");
    }

    #[test]
    fn ports_repeat_and_defaults_apply() {
        let cli = Cli::try_parse_from(["numstream-client", "--port", "7000", "--port", "7001"])
            .expect("valid");
        assert_eq!(cli.ports, [7000, 7001]);
        assert_eq!(cli.host, "127.0.0.1");
        assert_eq!(cli.count, None);
        assert_eq!(cli.client_id, None);
        assert!(!cli.json && !cli.quiet && !cli.verbose);
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
            ("--json", "Example: --json"),
            ("--quiet", "Example: --quiet"),
            ("--verbose", "Example: --verbose"),
        ] {
            assert!(help.contains(flag), "{flag} missing from help");
            assert!(help.contains(example), "{example} missing from help");
        }
        assert!(help.contains("[default: 127.0.0.1]"));
        assert!(help.contains("[default: random"));
        assert!(help.contains("Exit codes:"));
    }
}
