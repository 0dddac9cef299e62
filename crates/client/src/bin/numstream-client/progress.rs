//! The terminal progress bar, and the log writer that keeps log lines from
//! tearing it.

use std::io::{self, Write};

use std::fmt;

use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use numstream_client::{Event, Observer};

/// Drives a progress bar from run events; a no-op when there is no bar.
#[derive(Debug)]
pub(crate) struct ProgressObserver {
    bar: Option<ProgressBar>,
    welcomes: u32,
    server: String,
}

impl ProgressObserver {
    pub(crate) fn new(bar: Option<ProgressBar>) -> Self {
        Self {
            bar,
            welcomes: 0,
            server: "connecting".to_owned(),
        }
    }

    fn status(&self) -> String {
        format!(
            "reconnects {}, {}",
            self.welcomes.saturating_sub(1),
            self.server
        )
    }
}

impl Observer for ProgressObserver {
    fn event(&mut self, event: &Event) {
        let Some(bar) = self.bar.clone() else {
            return;
        };
        match event {
            Event::Number { .. } => bar.inc(1),
            Event::Connected { addr } => {
                self.server = addr.to_string();
                bar.set_message(self.status());
            }
            Event::Welcomed { next_index, .. } => {
                self.welcomes += 1;
                bar.set_position(u64::from(*next_index));
                bar.set_message(self.status());
            }
            Event::Reconnecting {
                cause,
                delay,
                attempt,
            } => {
                let delay = humantime::format_duration(std::time::Duration::from_millis(
                    u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                ));
                bar.set_message(format!(
                    "reconnects {}, retry #{attempt} in {delay}: {cause}",
                    self.welcomes.saturating_sub(1)
                ));
            }
            Event::Completed | Event::Failed { .. } => bar.finish_and_clear(),
            _ => {}
        }
    }
}

/// A bar for `count` numbers on stderr.
pub(crate) fn bar(count: u16) -> ProgressBar {
    let bar = ProgressBar::new(u64::from(count));
    // Compact enough that the status message survives an 80-column
    // terminal at count 65535.
    let style = ProgressStyle::with_template(
        "{spinner:.green} [{bar:20.cyan/blue}] {pos}/{len} {rate} ETA {eta} {wide_msg}",
    )
    .map(|style| {
        style.progress_chars("=> ").with_key(
            "rate",
            |state: &ProgressState, out: &mut dyn fmt::Write| {
                let _ = write!(out, "{:.1}/s", state.per_sec());
            },
        )
    })
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message("connecting");
    // Keeps the spinner and elapsed time moving while the server is slow
    // or the client is waiting to reconnect.
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// `tracing_subscriber` writer for stderr that hides the bar while a log
/// line is written, so lines and bar never overwrite each other.
#[derive(Debug, Clone)]
pub(crate) struct LogWriter {
    bar: Option<ProgressBar>,
}

impl LogWriter {
    pub(crate) fn new(bar: Option<ProgressBar>) -> Self {
        Self { bar }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Write for LogWriter {
    // The fmt layer formats each event completely and writes it in one
    // call, so suspending per write keeps whole lines intact.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.bar {
            Some(bar) if !bar.is_finished() => bar.suspend(|| io::stderr().write_all(buf))?,
            _ => io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}
