//! Progress and messages. Core code reports through the small [`Progress`] and
//! [`Transfer`] traits; this module holds their two implementations and is the
//! only user of indicatif: a live bar on stderr when stderr is a terminal, and
//! plain one-line summaries otherwise (cron, pipes, tests). `--quiet` keeps
//! only errors; `--debug` adds the commands that run and why, and without a
//! terminal a progress line per stream every [`LINE_INTERVAL`]. Neither
//! display shows more than 100% or a wrapped number: past its estimate a
//! stream is shown as bytes and rate.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::sys::Unpoisoned;

/// How much the user wants to hear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Normal,
    Debug,
}

/// Where core code sends what the user should see.
pub trait Progress: Send + Sync {
    /// A line of normal output (plans, summaries, notices).
    fn info(&self, line: &str);
    /// A warning: shown even with `--quiet`, since it may explain a later error.
    fn warn(&self, line: &str);
    /// Only with `--debug`.
    fn debug(&self, line: &str);
    /// Start showing one byte stream; `total` is the estimated size if known.
    fn transfer(&self, label: &str, total: Option<u64>) -> Box<dyn Transfer>;
}

/// One running byte stream.
pub trait Transfer: Send + Sync {
    fn add(&self, bytes: u64);
    /// This stream continues an interrupted one of which `bytes` already
    /// arrived: the display starts there (and counts its rate from there).
    fn resume_at(&self, _bytes: u64) {}
    /// A short note shown beside the stream (e.g. "reconnecting"); "" clears it.
    fn status(&self, _note: &str) {}
    /// Ends the display (the caller prints the dataset's summary line).
    fn finish(&self);
}

/// Builds the reporter for this run: terminal bars on a TTY (one per
/// stream, `--jobs` of them stacked), plain lines otherwise.
pub fn reporter(verbosity: Verbosity) -> Box<dyn Progress> {
    let tty = std::io::stderr().is_terminal();
    Box::new(Reporter {
        verbosity,
        bars: tty.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4))),
    })
}

struct Reporter {
    verbosity: Verbosity,
    /// On a terminal: the live bars, one line each; messages are printed
    /// above them.
    bars: Option<MultiProgress>,
}

impl Reporter {
    /// A line on stderr that does not tear the live bars.
    fn say(&self, line: &str) {
        match &self.bars {
            Some(bars) => bars.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }
}

impl Progress for Reporter {
    fn info(&self, line: &str) {
        if self.verbosity >= Verbosity::Normal {
            self.say(line);
        }
    }

    fn warn(&self, line: &str) {
        self.say(&format!("warning: {line}"));
    }

    fn debug(&self, line: &str) {
        if self.verbosity >= Verbosity::Debug {
            self.say(&format!("debug: {line}"));
        }
    }

    fn transfer(&self, label: &str, total: Option<u64>) -> Box<dyn Transfer> {
        if self.verbosity == Verbosity::Quiet {
            return Box::new(Silent);
        }
        if let Some(bars) = &self.bars {
            Box::new(Bar::new(bars, label, total))
        } else if self.verbosity >= Verbosity::Debug {
            Box::new(Lines::new(label, total))
        } else {
            Box::new(Plain)
        }
    }
}

/// `--quiet`: nothing at all.
struct Silent;

impl Transfer for Silent {
    fn add(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// No terminal: nothing per stream; the summary line comes from the caller.
struct Plain;

impl Transfer for Plain {
    fn add(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// How often [`Lines`] prints a stream's progress.
pub const LINE_INTERVAL: Duration = Duration::from_secs(1);

/// No terminal, `--debug`: a line per stream every [`LINE_INTERVAL`] and
/// one at the end, for logs ("tank/x: 12.30 MiB of 40.00 MiB (30%)").
struct Lines {
    label: String,
    total: Option<u64>,
    start: AtomicU64,
    done: AtomicU64,
    began: Instant,
    next: Mutex<Instant>,
}

impl Lines {
    fn new(label: &str, total: Option<u64>) -> Lines {
        let now = Instant::now();
        Lines {
            label: label.to_string(),
            total,
            start: AtomicU64::new(0),
            done: AtomicU64::new(0),
            began: now,
            next: Mutex::new(now),
        }
    }

    fn print(&self) {
        let (start, done) = (
            self.start.load(Ordering::Relaxed),
            self.done.load(Ordering::Relaxed),
        );
        eprintln!(
            "{}",
            progress_line(
                &self.label,
                done,
                self.total,
                done - start.min(done),
                self.began.elapsed()
            )
        );
    }
}

impl Transfer for Lines {
    fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
        let mut next = self.next.locked();
        if Instant::now() >= *next {
            *next = Instant::now() + LINE_INTERVAL;
            drop(next);
            self.print();
        }
    }

    fn resume_at(&self, bytes: u64) {
        self.start.store(bytes, Ordering::Relaxed);
        self.done.store(bytes, Ordering::Relaxed);
        self.print();
    }

    fn finish(&self) {
        self.print();
    }
}

/// One progress line: "LABEL: DONE of TOTAL (P%)" while `done` is within
/// the estimate, else "LABEL: DONE (RATE)" with the rate of the `new` bytes
/// this run moved. The percentage is never above 100.
pub fn progress_line(
    label: &str,
    done: u64,
    total: Option<u64>,
    new: u64,
    elapsed: Duration,
) -> String {
    match total.filter(|t| *t > 0 && done <= *t) {
        Some(t) => format!(
            "{label}: {} of {} ({}%)",
            human_bytes(done),
            human_bytes(t),
            u128::from(done) * 100 / u128::from(t)
        ),
        None => format!(
            "{label}: {} ({})",
            human_bytes(done),
            human_rate(new, elapsed)
        ),
    }
}

/// A live indicatif bar. With a known total it shows percent and ETA; when the
/// stream outgrows its estimate the bar turns into a byte counter, so it
/// never shows more than 100% or a wrapped number.
struct Bar {
    bar: ProgressBar,
    total: Option<u64>,
    done: AtomicU64,
    overflowed: Mutex<bool>,
}

const STYLE_SIZED: &str =
    "{prefix} [{bar:30}] {percent:>3}% {bytes}/{total_bytes} {decimal_bytes_per_sec} ETA {eta} {msg}";
const STYLE_UNSIZED: &str = "{prefix} {spinner} {bytes} {decimal_bytes_per_sec} {elapsed} {msg}";

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl Bar {
    /// A bar below the others in `bars` (streams of `--jobs` side by side).
    fn new(bars: &MultiProgress, label: &str, total: Option<u64>) -> Bar {
        let bar = match total {
            Some(n) if n > 0 => ProgressBar::new(n).with_style(style(STYLE_SIZED)),
            _ => ProgressBar::no_length().with_style(style(STYLE_UNSIZED)),
        };
        let bar = bars.add(bar);
        bar.set_prefix(label.to_string());
        bar.enable_steady_tick(Duration::from_millis(250));
        Bar {
            bar,
            total: total.filter(|n| *n > 0),
            done: AtomicU64::new(0),
            overflowed: Mutex::new(false),
        }
    }
}

impl Bar {
    /// Shows `done`, turning into a byte counter past the estimate.
    fn show(&self, done: u64) {
        if let Some(total) = self.total {
            if done > total {
                let mut over = self.overflowed.locked();
                if !*over {
                    *over = true;
                    self.bar.unset_length();
                    self.bar.set_style(style(STYLE_UNSIZED));
                }
            }
        }
        self.bar.set_position(done);
    }
}

impl Transfer for Bar {
    fn add(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.show(done);
    }

    fn resume_at(&self, bytes: u64) {
        self.done.store(bytes, Ordering::Relaxed);
        self.show(bytes);
        self.bar.reset_eta();
    }

    fn status(&self, note: &str) {
        self.bar.set_message(note.to_string());
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if !self.bar.is_finished() {
            self.bar.finish_and_clear();
        }
    }
}

/// "1.50 GiB", "512 B": for summaries and messages.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// "123.4 MB/s" from bytes over a duration (decimal megabytes, as network tools show).
pub fn human_rate(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    format!("{:.1} MB/s", bytes as f64 / secs / 1e6)
}

/// A compact duration for summaries: "4.2s", "3m12s".
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = d.as_secs();
        if whole < 3600 {
            format!("{}m{:02}s", whole / 60, whole % 60)
        } else {
            format!(
                "{}h{:02}m{:02}s",
                whole / 3600,
                (whole % 3600) / 60,
                whole % 60
            )
        }
    }
}

/// Measures a stream for its summary line.
pub struct Stopwatch(Instant);

impl Stopwatch {
    pub fn start() -> Stopwatch {
        Stopwatch(Instant::now())
    }
    pub fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_humanised_without_wrapping() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(1 << 30), "1.00 GiB");
        assert_eq!(human_bytes(u64::MAX), "16384.00 PiB");
        assert!(human_bytes(u64::MAX).ends_with("PiB"));
    }

    #[test]
    fn rates_and_durations_read_naturally() {
        assert_eq!(
            human_rate(100_000_000, Duration::from_secs(1)),
            "100.0 MB/s"
        );
        assert_eq!(human_rate(5, Duration::ZERO), "0.0 MB/s");
        assert_eq!(human_duration(Duration::from_millis(4200)), "4.2s");
        assert_eq!(human_duration(Duration::from_secs(192)), "3m12s");
        assert_eq!(human_duration(Duration::from_secs(3723)), "1h02m03s");
    }

    #[test]
    fn a_bar_past_its_estimate_drops_the_total() {
        let bar = Bar::new(
            &MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
            "t",
            Some(100),
        );
        bar.bar.set_draw_target(ProgressDrawTarget::hidden());
        bar.add(60);
        assert_eq!(bar.bar.length(), Some(100));
        bar.add(60);
        assert_eq!(
            bar.bar.length(),
            None,
            "past 100% the bar must stop showing a percentage"
        );
        assert_eq!(bar.bar.position(), 120);
        bar.finish();
    }

    #[test]
    fn a_resumed_bar_starts_at_the_bytes_already_received() {
        let bar = Bar::new(
            &MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
            "t",
            Some(100),
        );
        bar.bar.set_draw_target(ProgressDrawTarget::hidden());
        bar.resume_at(40);
        assert_eq!(bar.bar.position(), 40);
        bar.add(50);
        assert_eq!((bar.bar.position(), bar.bar.length()), (90, Some(100)));
        let over = Bar::new(
            &MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
            "t",
            Some(100),
        );
        over.bar.set_draw_target(ProgressDrawTarget::hidden());
        over.resume_at(150);
        assert_eq!(over.bar.length(), None, "an estimate already passed");
    }

    #[test]
    fn progress_lines_never_pass_100_percent() {
        let sec = Duration::from_secs(1);
        let mib = 1 << 20;
        assert_eq!(
            progress_line("tank/x", 12 * mib, Some(40 * mib), 0, sec),
            "tank/x: 12.00 MiB of 40.00 MiB (30%)"
        );
        assert_eq!(
            progress_line("t", 40 * mib, Some(40 * mib), 0, sec),
            "t: 40.00 MiB of 40.00 MiB (100%)"
        );
        // Past the estimate, or none: bytes and the rate of the new bytes.
        assert_eq!(
            progress_line("t", 41 * mib, Some(40 * mib), 2_000_000, sec),
            "t: 41.00 MiB (2.0 MB/s)"
        );
        assert_eq!(progress_line("t", 5, None, 5, sec), "t: 5 B (0.0 MB/s)");
        assert_eq!(progress_line("t", 5, Some(0), 5, sec), "t: 5 B (0.0 MB/s)");
        // No overflow near the top of the range.
        assert_eq!(
            progress_line("t", u64::MAX - 1, Some(u64::MAX), 0, sec),
            "t: 16384.00 PiB of 16384.00 PiB (99%)"
        );
    }
}
