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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn hidden_bar(count: u16) -> ProgressBar {
        let bar = bar(count);
        bar.disable_steady_tick();
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        bar
    }

    #[test]
    fn shows_progress_reconnects_and_the_current_server() {
        let bar = hidden_bar(100);
        let mut observer = ProgressObserver::new(Some(bar.clone()));
        let first = "127.0.0.1:7000".parse().expect("address");
        observer.event(&Event::Connected { addr: first });
        assert_eq!(bar.message(), "reconnects 0, 127.0.0.1:7000");
        observer.event(&Event::Welcomed {
            next_index: 0,
            count: 100,
        });
        for index in 0..40 {
            observer.event(&Event::Number { index, value: 1 });
        }
        assert_eq!((bar.position(), bar.length()), (40, Some(100)));

        observer.event(&Event::Reconnecting {
            cause: "127.0.0.1:7000 closed the connection".into(),
            delay: Duration::from_micros(42_345),
            attempt: 1,
        });
        assert_eq!(
            bar.message(),
            "reconnects 0, retry #1 in 42ms: 127.0.0.1:7000 closed the connection"
        );
        let second = "127.0.0.1:7001".parse().expect("address");
        observer.event(&Event::Connected { addr: second });
        observer.event(&Event::Welcomed {
            next_index: 40,
            count: 100,
        });
        assert_eq!(bar.message(), "reconnects 1, 127.0.0.1:7001");
        assert_eq!(bar.position(), 40, "the resume continues where it was");

        observer.event(&Event::Completed);
        assert!(bar.is_finished(), "cleared before the report is printed");
    }

    /// A terminal 100 columns wide that keeps what was drawn since the
    /// last line clear.
    #[derive(Debug, Clone, Default)]
    struct Screen(std::sync::Arc<std::sync::Mutex<String>>);

    impl Screen {
        fn shown(&self) -> String {
            self.0.lock().expect("screen").clone()
        }
    }

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            100
        }
        fn move_cursor_up(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn write_line(&self, line: &str) -> io::Result<()> {
            self.write_str(line)
        }
        fn write_str(&self, text: &str) -> io::Result<()> {
            self.0.lock().expect("screen").push_str(text);
            Ok(())
        }
        fn clear_line(&self) -> io::Result<()> {
            self.0.lock().expect("screen").clear();
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn one_line_shows_received_of_total_rate_eta_reconnects_and_server() {
        let screen = Screen::default();
        let bar = bar(65535);
        bar.disable_steady_tick();
        bar.set_draw_target(indicatif::ProgressDrawTarget::term_like(Box::new(
            screen.clone(),
        )));
        bar.set_position(1234);
        bar.set_message("reconnects 2, 127.0.0.1:7000");
        bar.tick();
        let line = screen.shown();
        for part in ["1234/65535", "/s ", "ETA ", "reconnects 2, 127.0.0.1:7000"] {
            assert!(line.contains(part), "{part:?} missing from {line:?}");
        }
        assert!(!line.contains('\n'), "one line: {line:?}");
    }

    #[test]
    fn without_a_bar_events_are_ignored() {
        // --quiet (or no terminal): no bar, and every event leaves the
        // observer as it was, with nothing drawn anywhere.
        let mut observer = ProgressObserver::new(None);
        let addr = "127.0.0.1:7000".parse().expect("address");
        observer.event(&Event::Connected { addr });
        observer.event(&Event::Welcomed {
            next_index: 0,
            count: 3,
        });
        observer.event(&Event::Number { index: 0, value: 1 });
        observer.event(&Event::Failed {
            error: "nope".into(),
        });
        assert!(observer.bar.is_none());
        assert_eq!(observer.welcomes, 0);
        assert_eq!(observer.status(), "reconnects 0, connecting");
    }
}
