//! Progress on a terminal, drawn by `indicatif`: a bar for inputs of known size
//! (bytes done, percent, ETA) and a spinner for unbounded ones, each with a status
//! message (records, rate, ok, failed, retried, mean batch, p99). Nothing is drawn
//! when stderr is not a terminal or with `--quiet` (indicatif's hidden target); the
//! end-of-run summary is printed either way.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::time::Instant;

/// What the status message shows.
pub struct Snapshot {
    pub ok: u64,
    pub failed: u64,
    pub retried: u64,
    pub mean_batch: f64,
    pub p99: Option<Duration>,
}

/// The bar (or spinner) and when its message was last rebuilt.
pub struct Progress {
    bar: ProgressBar,
    started: Instant,
    last: Option<Instant>,
}

/// The message is rebuilt at most this often (indicatif redraws at most 20 times a
/// second on its own).
const EVERY: Duration = Duration::from_millis(200);

impl Progress {
    /// `total_bytes`: the input's size, when known (a file), for a bar and an ETA.
    pub fn new(quiet: bool, total_bytes: Option<u64>) -> Progress {
        let target = if quiet || !std::io::stderr().is_terminal() {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = match total_bytes.filter(|t| *t > 0) {
            Some(total) => ProgressBar::with_draw_target(Some(total), target).with_style(
                ProgressStyle::with_template("[{bar:24}] {percent:>3} %  ETA {eta}  {msg}")
                    .expect("a valid template")
                    .progress_chars("#>."),
            ),
            None => ProgressBar::with_draw_target(None, target).with_style(
                ProgressStyle::with_template("{spinner} {msg}").expect("a valid template"),
            ),
        };
        Progress {
            bar,
            started: Instant::now(),
            last: None,
        }
    }

    /// Updates the position (input bytes whose records have their outcome) and, if
    /// enough time has passed, the message.
    pub fn tick(&mut self, done_bytes: u64, snap: impl FnOnce() -> Snapshot) {
        if self.bar.is_hidden() {
            return;
        }
        self.bar.set_position(done_bytes);
        let now = Instant::now();
        if self.last.is_some_and(|l| now.duration_since(l) < EVERY) {
            return;
        }
        self.last = Some(now);
        self.bar
            .set_message(message(&snap(), now.duration_since(self.started)));
        self.bar.tick();
    }

    /// Clears the bar, before the summary.
    pub fn finish(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// The status message (pure, for tests).
pub fn message(s: &Snapshot, elapsed: Duration) -> String {
    let done = s.ok + s.failed;
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
    let mut line = format!(
        "{done} records ({rate:.0}/s): {} ok, {} failed, {} retried; mean batch {:.1}",
        s.ok, s.failed, s.retried, s.mean_batch
    );
    if let Some(p99) = s.p99 {
        line.push_str(&format!(", p99 {:.0} ms", p99.as_secs_f64() * 1e3));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_says_records_rate_outcomes_batch_and_p99() {
        let s = Snapshot {
            ok: 90,
            failed: 10,
            retried: 3,
            mean_batch: 12.5,
            p99: Some(Duration::from_millis(42)),
        };
        assert_eq!(
            message(&s, Duration::from_secs(2)),
            "100 records (50/s): 90 ok, 10 failed, 3 retried; mean batch 12.5, p99 42 ms"
        );
        // Hidden when quiet: nothing is drawn, ticks cost nothing.
        let mut p = Progress::new(true, Some(1_000));
        p.tick(500, || unreachable!("a hidden bar builds no message"));
        p.finish();
    }
}
