//! What `numstream-server` and `numstream-client` share on the command
//! line: `--generate` (a man page or a shell completion script, from the
//! program's own clap definition, on stdout), whether stderr gets
//! colours, the `--ready-file` a launcher waits for, and value parsers
//! whose errors name the accepted range (`values`).
//!
//! ```no_run
//! let command = clap::Command::new("demo").arg(clap::Arg::new("port").long("port"));
//! let matches = numstream_cli_support::with_generate(command.clone()).get_matches();
//! // Prints and exits when --generate was given.
//! numstream_cli_support::generate_if_asked(&matches, command);
//! ```

pub mod values;

use std::io::{IsTerminal, Write};

use clap::builder::PossibleValue;
use clap::{Arg, ArgMatches, Command, ValueEnum};
use clap_complete::Shell;

/// The id of the `--generate` argument.
pub const GENERATE: &str = "generate";

/// What `--generate` writes to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generate {
    /// A roff man page (section 1).
    Man,
    /// A completion script for this shell.
    Completion(Shell),
}

impl ValueEnum for Generate {
    fn value_variants<'a>() -> &'a [Self] {
        &[
            Self::Man,
            Self::Completion(Shell::Bash),
            Self::Completion(Shell::Zsh),
            Self::Completion(Shell::Fish),
            Self::Completion(Shell::Elvish),
            Self::Completion(Shell::PowerShell),
        ]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Self::Man => PossibleValue::new("man").help("man page (roff), section 1"),
            Self::Completion(shell) => {
                let value = shell.to_possible_value()?;
                let help = format!("{} completion script", value.get_name());
                value.help(help)
            }
        })
    }
}

/// `command` with `--generate <man|bash|zsh|fish|elvish|powershell>`,
/// which needs no other flag (not even required ones).
pub fn with_generate(command: Command) -> Command {
    command.arg(
        Arg::new(GENERATE)
            .long(GENERATE)
            .value_name("WHAT")
            .value_parser(clap::builder::EnumValueParser::<Generate>::new())
            .exclusive(true)
            .help_heading("Packaging")
            .help("Print a man page or a shell completion script to stdout, then exit")
            .long_help(
                "Print a man page or a shell completion script to stdout, then exit. \
                 Needs no other flag.\n\n\
                 Example: --generate man > numstream.1; --generate bash > /etc/bash_completion.d/numstream",
            ),
    )
}

/// If `matches` (from [`with_generate`]) asked for `--generate`, writes it
/// for `command` (the program's definition without `--generate`, so the
/// output documents only real flags) and exits: 0, or 1 if stdout failed.
pub fn generate_if_asked(matches: &ArgMatches, command: Command) {
    let Some(what) = matches.get_one::<Generate>(GENERATE) else {
        return;
    };
    let mut out = Vec::new();
    let written = write(*what, command, &mut out);
    let mut stdout = std::io::stdout().lock();
    match written
        .and_then(|()| stdout.write_all(&out))
        .and_then(|()| stdout.flush())
    {
        Ok(()) => std::process::exit(0),
        Err(error) => {
            eprintln!("cannot write the generated output: {error}");
            std::process::exit(1);
        }
    }
}

/// Writes `what` for `command` to `out`.
pub fn write(what: Generate, mut command: Command, out: &mut dyn Write) -> std::io::Result<()> {
    match what {
        Generate::Man => clap_mangen::Man::new(command).render(out),
        Generate::Completion(shell) => {
            let name = command.get_name().to_owned();
            clap_complete::generate(shell, &mut command, name, out);
            Ok(())
        }
    }
}

/// Whether log lines on stderr may carry ANSI colours: only on a terminal,
/// and not when `NO_COLOR` is set (<https://no-color.org>).
pub fn stderr_wants_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Writes a `--ready-file`: whole or not at all (written beside it, then
/// renamed), so a launcher polling for it never reads half of it.
pub fn write_ready_file(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    std::fs::write(&partial, text).and_then(|()| std::fs::rename(&partial, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> Command {
        Command::new("demo").about("A demo").arg(
            Arg::new("port")
                .long("port")
                .required(true)
                .help("The port"),
        )
    }

    #[test]
    fn generate_needs_no_required_flag_and_lists_every_target() {
        let matches = with_generate(demo())
            .try_get_matches_from(["demo", "--generate", "zsh"])
            .expect("--generate alone is valid");
        assert_eq!(
            matches.get_one::<Generate>(GENERATE),
            Some(&Generate::Completion(Shell::Zsh))
        );
        let error = with_generate(demo())
            .try_get_matches_from(["demo", "--generate", "tcsh"])
            .expect_err("unknown target");
        let text = error.to_string();
        for accepted in ["man", "bash", "zsh", "fish", "elvish", "powershell"] {
            assert!(text.contains(accepted), "{text}");
        }
        with_generate(demo()).debug_assert();
    }

    #[test]
    fn man_page_and_completions_document_the_flags() {
        let mut man = Vec::new();
        write(Generate::Man, demo(), &mut man).expect("man page");
        let man = String::from_utf8(man).expect("UTF-8");
        assert!(man.starts_with(".ie") || man.contains(".TH demo"), "{man}");
        assert!(man.contains("port"), "{man}");
        let mut bash = Vec::new();
        write(Generate::Completion(Shell::Bash), demo(), &mut bash).expect("bash");
        let bash = String::from_utf8(bash).expect("UTF-8");
        assert!(bash.contains("--port"), "{bash}");
    }
}
