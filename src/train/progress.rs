//! Progress reporting: an indicatif bar with loss, images/s and ETA on a terminal, plain
//! periodic lines otherwise, nothing with `--quiet` (or on ranks other than 0).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How progress is shown.
pub enum Progress {
    /// A bar on stderr.
    Bar(ProgressBar),
    /// A line every `every` on stderr.
    Lines {
        /// Interval between lines.
        every: Duration,
        /// When the last line was printed.
        last: Instant,
        /// Total steps planned.
        total: u64,
        /// Start of the run (for the ETA).
        start: Instant,
        /// Step at the start (a resumed run starts later).
        first_step: u64,
    },
    /// Nothing.
    Quiet,
}

impl Progress {
    /// Picks the form: quiet, a bar on a terminal, or lines.
    pub fn new(quiet: bool, total_steps: u64, start_step: u64, every_s: f64) -> Self {
        if quiet {
            return Progress::Quiet;
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total_steps);
            if let Ok(style) = ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            ) {
                bar.set_style(style);
            }
            bar.set_position(start_step);
            bar.reset_eta();
            Progress::Bar(bar)
        } else {
            Progress::Lines {
                every: Duration::from_secs_f64(every_s.max(0.0)),
                last: Instant::now(),
                total: total_steps,
                start: Instant::now(),
                first_step: start_step,
            }
        }
    }

    /// Reports a finished step.
    pub fn step(&mut self, step: u64, epoch: u64, loss: f64, images_per_s: f64) {
        match self {
            Progress::Bar(bar) => {
                bar.set_position(step);
                bar.set_message(format!(
                    "epoch {epoch}  loss {loss:.4}  {images_per_s:.2} img/s"
                ));
            }
            Progress::Lines {
                every,
                last,
                total,
                start,
                first_step,
            } => {
                if last.elapsed() >= *every || step == *total {
                    *last = Instant::now();
                    let done = step.saturating_sub(*first_step).max(1) as f64;
                    let eta =
                        start.elapsed().as_secs_f64() / done * total.saturating_sub(step) as f64;
                    eprintln!(
                        "step {step}/{total}  epoch {epoch}  loss {loss:.4}  {images_per_s:.2} img/s  eta {eta:.0} s"
                    );
                }
            }
            Progress::Quiet => {}
        }
    }

    /// Prints a message without breaking the bar.
    pub fn println(&self, msg: &str) {
        match self {
            Progress::Bar(bar) => bar.println(msg),
            Progress::Lines { .. } => eprintln!("{msg}"),
            Progress::Quiet => {}
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
