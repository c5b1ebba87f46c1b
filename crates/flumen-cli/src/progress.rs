//! Progress on a terminal: a bar for inputs of known size (records, rate, ETA), a
//! live status line for unbounded ones (ok, failed, rate, mean batch, p99). Nothing is
//! drawn when stderr is not a terminal or with `--quiet`; the end-of-run summary is
//! printed either way.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use tokio::time::Instant;

/// What the status line shows.
pub struct Snapshot {
    pub ok: u64,
    pub failed: u64,
    pub retried: u64,
    pub mean_batch: f64,
    pub p99: Option<Duration>,
}

/// Draws at most every `EVERY` on stderr.
pub struct Progress {
    enabled: bool,
    total_bytes: Option<u64>,
    started: Instant,
    last: Option<Instant>,
}

const EVERY: Duration = Duration::from_millis(200);

impl Progress {
    /// `total_bytes`: the input's size, when known (a file), for a bar and an ETA.
    pub fn new(quiet: bool, total_bytes: Option<u64>) -> Progress {
        Progress {
            enabled: !quiet && std::io::stderr().is_terminal(),
            total_bytes: total_bytes.filter(|t| *t > 0),
            started: Instant::now(),
            last: None,
        }
    }

    /// Redraws if enough time has passed; `done_bytes`: input bytes whose records
    /// have their outcome.
    pub fn tick(&mut self, done_bytes: u64, snap: impl FnOnce() -> Snapshot) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self.last.is_some_and(|l| now.duration_since(l) < EVERY) {
            return;
        }
        self.last = Some(now);
        let line = render(
            &snap(),
            self.total_bytes,
            done_bytes,
            now.duration_since(self.started),
        );
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
    }

    /// Clears the line, before the summary.
    pub fn finish(&mut self) {
        if self.enabled && self.last.is_some() {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
    }
}

/// One status line (pure, for tests).
pub fn render(
    s: &Snapshot,
    total_bytes: Option<u64>,
    done_bytes: u64,
    elapsed: Duration,
) -> String {
    let done = s.ok + s.failed;
    let secs = elapsed.as_secs_f64().max(1e-3);
    let rate = done as f64 / secs;
    let mut line = String::new();
    if let Some(total) = total_bytes {
        let frac = (done_bytes as f64 / total as f64).clamp(0.0, 1.0);
        let width = 24;
        let filled = (frac * width as f64).round() as usize;
        let eta = if frac > 0.0 {
            format!("{:.0} s", secs * (1.0 - frac) / frac)
        } else {
            "?".into()
        };
        line.push_str(&format!(
            "[{}{}] {:>3.0} %  ETA {eta}  ",
            "#".repeat(filled),
            ".".repeat(width - filled),
            frac * 100.0
        ));
    }
    line.push_str(&format!(
        "{done} records ({rate:.0}/s): {} ok, {} failed, {} retried; mean batch {:.1}",
        s.ok, s.failed, s.retried, s.mean_batch
    ));
    if let Some(p99) = s.p99 {
        line.push_str(&format!(", p99 {:.0} ms", p99.as_secs_f64() * 1e3));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_for_known_sizes_and_a_status_line_otherwise() {
        let s = Snapshot {
            ok: 90,
            failed: 10,
            retried: 3,
            mean_batch: 12.5,
            p99: Some(Duration::from_millis(42)),
        };
        let bar = render(&s, Some(1000), 250, Duration::from_secs(2));
        assert!(bar.starts_with("[######.................."), "{bar}");
        assert!(bar.contains(" 25 %  ETA 6 s"), "{bar}");
        assert!(
            bar.contains(
                "100 records (50/s): 90 ok, 10 failed, 3 retried; mean batch 12.5, p99 42 ms"
            ),
            "{bar}"
        );
        let status = render(&s, None, 250, Duration::from_secs(2));
        assert!(status.starts_with("100 records"), "{status}");
    }
}
