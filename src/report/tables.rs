//! The report's numbers: time to a loss or Dice target (Table 1), the throughput speedup of
//! each run over its series' 1-rank CPU run (the data of Fig. 2), the per-run summary table,
//! and their renderings as CSV, Markdown and HTML.

use std::collections::BTreeMap;

use super::runs::{Run, short_device};
use crate::rundir::{StepRecord as Step, ValRecord as Val};
use crate::util::stats::median;

/// Steps in the trailing moving average of the loss that decides "loss ≤ target".
pub(crate) const LOSS_WINDOW: usize = 5;

/// Seconds (the step's `wall_s`) at which the mean loss of the last `window` steps is first
/// ≤ `target`; `None` if never (the first `window − 1` steps have no full window). A window
/// holding a non-finite loss does not count.
pub(crate) fn seconds_to_loss(steps: &[Step], target: f64, window: usize) -> Option<f64> {
    if window == 0 || steps.len() < window {
        return None;
    }
    steps.windows(window).find_map(|w| {
        let mean = w.iter().map(|s| s.loss).sum::<f64>() / window as f64;
        (mean.is_finite() && mean <= target).then(|| w[window - 1].wall_s)
    })
}

/// Seconds (the validation's `wall_s`) of the first validation whose liver Dice ≥ `target`.
pub(crate) fn seconds_to_dice(vals: &[Val], target: f64) -> Option<f64> {
    vals.iter()
        .find(|v| v.dice_liver.is_finite() && v.dice_liver >= target)
        .map(|v| v.wall_s)
}

/// The trailing `window`-step moving average of the loss, at each step from the `window`-th
/// on: (wall_s, mean).
pub(crate) fn moving_average(steps: &[Step], window: usize) -> Vec<(f64, f64)> {
    if window == 0 || steps.len() < window {
        return Vec::new();
    }
    steps
        .windows(window)
        .map(|w| {
            (
                w[window - 1].wall_s,
                w.iter().map(|s| s.loss).sum::<f64>() / window as f64,
            )
        })
        .collect()
}

/// One cell: the CSV text (full precision) and the text shown in Markdown and HTML.
#[derive(Clone, Debug)]
pub(crate) struct Cell {
    pub csv: String,
    pub text: String,
    /// Right-aligned in HTML.
    pub numeric: bool,
}

impl Cell {
    fn text(s: impl Into<String>) -> Self {
        let s = s.into();
        Self {
            csv: s.clone(),
            text: s,
            numeric: false,
        }
    }

    fn int(v: u64) -> Self {
        Self::unknown_if(v == 0, v.to_string(), v.to_string())
    }

    /// A float; 0 or non-finite reads as unknown ("—", empty in CSV).
    fn num(v: f64, shown: String) -> Self {
        Self::unknown_if(!v.is_finite() || v == 0.0, format!("{v}"), shown)
    }

    fn opt(v: Option<f64>) -> Self {
        match v {
            Some(x) if x.is_finite() => Self {
                csv: format!("{x}"),
                text: sig(x),
                numeric: true,
            },
            _ => Self::unknown_if(true, String::new(), String::new()),
        }
    }

    fn unknown_if(unknown: bool, csv: String, text: String) -> Self {
        if unknown {
            Self {
                csv: String::new(),
                text: "—".into(),
                numeric: true,
            }
        } else {
            Self {
                csv,
                text,
                numeric: true,
            }
        }
    }

    fn hours(s: Option<f64>) -> Self {
        match s {
            Some(s) => Self {
                csv: format!("{:.6}", s / 3600.0),
                text: sig(s / 3600.0),
                numeric: true,
            },
            None => Self {
                csv: "not reached".into(),
                text: "not reached".into(),
                numeric: false,
            },
        }
    }
}

/// A number with about 3 significant digits, without exponent for everyday magnitudes, and
/// with a true minus sign.
pub(crate) fn sig(x: f64) -> String {
    if !x.is_finite() {
        return "—".into();
    }
    if x < 0.0 {
        return format!("−{}", sig(-x));
    }
    let a = x;
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else if a >= 0.001 {
        // 3 significant digits.
        let decimals = (2 - a.log10().floor() as i32).max(0) as usize;
        format!("{x:.decimals$}")
    } else {
        format!("{x:.2e}")
    }
}

/// A target value as shown in headers, with a true minus sign ("−0.75").
pub(crate) fn target_text(t: f64) -> String {
    format!("{t}").replace('-', "−")
}

/// A table with a CSV and a human rendering.
#[derive(Clone, Debug, Default)]
pub(crate) struct Table {
    /// Column titles shown in Markdown and HTML.
    pub titles: Vec<String>,
    /// Column names in the CSV header.
    pub csv_names: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
}

impl Table {
    fn column(&mut self, title: &str, csv: &str) {
        self.titles.push(title.into());
        self.csv_names.push(csv.into());
    }

    /// RFC 4180 CSV with a header line.
    pub fn to_csv(&self) -> String {
        let mut out = String::new();
        let line = |cells: &mut dyn Iterator<Item = &str>, out: &mut String| {
            let row: Vec<String> = cells.map(crate::util::csv_field).collect();
            out.push_str(&row.join(","));
            out.push('\n');
        };
        line(&mut self.csv_names.iter().map(String::as_str), &mut out);
        for r in &self.rows {
            line(&mut r.iter().map(|c| c.csv.as_str()), &mut out);
        }
        out
    }

    /// A GitHub-flavoured Markdown table.
    pub fn to_markdown(&self) -> String {
        let esc = |s: &str| s.replace('|', "\\|").replace('\n', " ");
        let mut out = String::new();
        out.push_str(&format!(
            "| {} |\n",
            self.titles
                .iter()
                .map(|t| esc(t))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
        out.push_str(&format!(
            "|{}|\n",
            self.titles
                .iter()
                .enumerate()
                .map(|(i, _)| {
                    let numeric = self
                        .rows
                        .iter()
                        .any(|r| r.get(i).is_some_and(|c| c.numeric));
                    if numeric { "---:" } else { "---" }
                })
                .collect::<Vec<_>>()
                .join("|")
        ));
        for r in &self.rows {
            out.push_str(&format!(
                "| {} |\n",
                r.iter()
                    .map(|c| esc(&c.text))
                    .collect::<Vec<_>>()
                    .join(" | ")
            ));
        }
        out
    }

    /// An HTML `<table>` (escaped).
    pub fn to_html(&self) -> String {
        let mut out = String::from("<table>\n<thead><tr>");
        for t in &self.titles {
            out.push_str(&format!("<th>{}</th>", html_escape(t)));
        }
        out.push_str("</tr></thead>\n<tbody>\n");
        for r in &self.rows {
            out.push_str("<tr>");
            for c in r {
                let class = if c.numeric { " class=\"num\"" } else { "" };
                out.push_str(&format!("<td{class}>{}</td>", html_escape(&c.text)));
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</tbody>\n</table>\n");
        out
    }
}

/// Escapes `&`, `<`, `>`, `"` and `'` for HTML text and attribute values.
pub(crate) fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn ranks_cell(r: u64) -> Cell {
    Cell::int(r)
}

/// Table 1: per run, its configuration, speed and time to each target.
pub(crate) fn time_to_target(runs: &[Run], loss_targets: &[f64], dice_target: f64) -> Table {
    let mut t = Table::default();
    t.column("run", "label");
    t.column("backend", "backend");
    t.column("device", "device");
    t.column("ranks", "ranks");
    t.column("global batch", "global_batch");
    t.column("epoch time (s)", "epoch_time_s");
    t.column("images/s", "images_per_s");
    t.column("peak RSS (MB)", "peak_rss_mb");
    for &lt in loss_targets {
        t.column(
            &format!("hours to loss ≤ {}", target_text(lt)),
            &format!("hours_to_loss_le_{lt}"),
        );
    }
    t.column(
        &format!("hours to Dice liver ≥ {}", target_text(dice_target)),
        &format!("hours_to_dice_liver_ge_{dice_target}"),
    );
    for r in runs {
        let mut row = vec![
            Cell::text(r.label.clone()),
            Cell::text(r.backend.clone()),
            Cell {
                csv: r.device.clone(),
                text: short_device(&r.device),
                numeric: false,
            },
            ranks_cell(r.ranks),
            Cell::int(r.global_batch),
            Cell::num(r.epoch_time_s, sig(r.epoch_time_s)),
            Cell::num(r.images_per_s, sig(r.images_per_s)),
            Cell::num(
                r.summary.peak_rss_mb,
                format!("{:.0}", r.summary.peak_rss_mb),
            ),
        ];
        for &lt in loss_targets {
            row.push(Cell::hours(seconds_to_loss(
                &r.metrics.steps,
                lt,
                LOSS_WINDOW,
            )));
        }
        row.push(Cell::hours(seconds_to_dice(&r.metrics.vals, dice_target)));
        t.rows.push(row);
    }
    t
}

/// The caption of Table 1 (how the times were measured).
pub(crate) fn time_to_target_caption() -> String {
    format!(
        "Hours of training wall time (the runs' `wall_s`, continued across resumes) until the \
         mean training loss of the last {LOSS_WINDOW} optimiser steps (a trailing {LOSS_WINDOW}-step \
         moving average; the loss is −Dice, lower is better) is first at or below each target, \
         and until the first validation whose hard liver Dice reaches the Dice target. \
         \"not reached\": not within the run. Epoch time: the summary's, else steps per epoch × \
         the median step time (warm-up steps skipped); images/s: the summary's mean over the run."
    )
}

/// `runs.csv`: one row per run with every summary number and the per-step split medians.
pub(crate) fn runs_table(runs: &[Run]) -> Table {
    let mut t = Table::default();
    let cols: [(&str, &str); 35] = [
        ("run", "label"),
        ("directory", "dir"),
        ("status", "status"),
        ("backend", "backend"),
        ("device", "device"),
        ("ranks", "ranks"),
        ("global batch", "global_batch"),
        ("accumulate", "accumulate"),
        ("workload", "workload"),
        ("steps", "steps"),
        ("epochs", "epochs"),
        ("steps/epoch", "steps_per_epoch"),
        ("wall (s)", "wall_s"),
        ("median step (s)", "median_step_s"),
        ("epoch time (s)", "epoch_time_s"),
        ("images/s", "images_per_s"),
        ("peak RSS (MB)", "peak_rss_mb"),
        ("final loss", "final_loss"),
        ("val loss", "val_loss"),
        ("Dice liver", "dice_liver"),
        ("Dice tumour", "dice_tumour"),
        ("parameters", "params"),
        ("train slices", "train_slices"),
        ("val slices", "val_slices"),
        ("data", "data"),
        ("data wait total (s)", "data_wait_s"),
        ("grad exchange", "grad_exchange"),
        ("weights hash", "weights_hash"),
        ("median compute (s)", "median_compute_s"),
        ("median copy (s)", "median_copy_s"),
        ("median comm (s)", "median_comm_s"),
        ("median data wait (s)", "median_data_wait_s"),
        ("step records", "step_records"),
        ("val records", "val_records"),
        ("torn last line", "torn_last_line"),
    ];
    for (title, csv) in cols {
        t.column(title, csv);
    }
    for r in runs {
        let s = &r.summary;
        let (steps, wall_s) = if r.has_summary {
            (s.steps, s.wall_s)
        } else {
            (
                r.metrics.steps.last().map_or(0, |x| x.step),
                r.metrics
                    .steps
                    .iter()
                    .map(|x| x.wall_s)
                    .chain(r.metrics.vals.iter().map(|v| v.wall_s))
                    .fold(0.0, f64::max),
            )
        };
        let f = |v: f64| Cell::num(v, sig(v));
        // Losses and Dice may legitimately be 0; only a missing summary makes them unknown.
        let g = |v: f64| {
            if r.has_summary {
                Cell {
                    csv: format!("{v}"),
                    text: sig(v),
                    numeric: true,
                }
            } else {
                Cell::opt(None)
            }
        };
        t.rows.push(vec![
            Cell::text(r.label.clone()),
            Cell::text(r.dir.display().to_string()),
            Cell::text(if r.has_summary {
                "finished"
            } else {
                "no summary.json (running or crashed)"
            }),
            Cell::text(r.backend.clone()),
            Cell::text(r.device.clone()),
            ranks_cell(r.ranks),
            Cell::int(r.global_batch),
            Cell::int(r.accumulate),
            Cell::text(r.workload.clone()),
            Cell::int(steps),
            f(s.epochs),
            Cell::int(r.steps_per_epoch),
            f(wall_s),
            f(r.median_step_s),
            f(r.epoch_time_s),
            f(r.images_per_s),
            Cell::num(s.peak_rss_mb, format!("{:.0}", s.peak_rss_mb)),
            g(s.final_loss),
            g(s.val_loss),
            g(s.dice_liver),
            g(s.dice_tumour),
            Cell::int(s.params),
            Cell::int(s.train_slices),
            Cell::int(s.val_slices),
            Cell::text(s.data.clone()),
            f(s.data_wait_s),
            Cell::text(s.grad_exchange.clone()),
            Cell::text(s.weights_hash.clone()),
            Cell::opt(r.median_compute_s),
            Cell::opt(r.median_copy_s),
            Cell::opt(r.median_comm_s),
            Cell::opt(r.median_data_wait_s),
            Cell::int(r.metrics.steps.len() as u64),
            Cell::int(r.metrics.vals.len() as u64),
            Cell::text(if r.metrics.torn_last_line {
                "yes"
            } else {
                "no"
            }),
        ]);
    }
    t
}

/// One CPU run in a scaling series.
#[derive(Clone, Debug)]
pub(crate) struct SpeedupPoint {
    pub label: String,
    pub ranks: u64,
    pub epoch_time_s: f64,
    pub images_per_s: f64,
    pub speedup: f64,
}

/// CPU runs sharing device and workload, normalised to the series' smallest rank count.
#[derive(Clone, Debug)]
pub(crate) struct Series {
    pub device: String,
    pub workload: String,
    /// Ranks of the base run (1 unless the series has no 1-rank run).
    pub base_ranks: u64,
    /// Throughput of the base (the median images/s over the runs at `base_ranks`).
    pub base_images_per_s: f64,
    pub points: Vec<SpeedupPoint>,
}

impl Series {
    pub fn name(&self) -> String {
        if self.workload.is_empty() {
            format!("CPU ({})", short_device(&self.device))
        } else {
            format!("CPU ({}): {}", short_device(&self.device), self.workload)
        }
    }

    /// (ranks, median speedup of the runs at that rank count), by ranks.
    pub fn median_line(&self) -> Vec<(u64, f64)> {
        let mut by: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
        for p in &self.points {
            by.entry(p.ranks).or_default().push(p.speedup);
        }
        by.into_iter()
            .filter_map(|(r, v)| median(v).map(|m| (r, m)))
            .collect()
    }
}

/// A GPU run, as a multiple of a CPU series' base speed.
#[derive(Clone, Debug)]
pub(crate) struct GpuRef {
    pub label: String,
    pub device: String,
    pub ranks: u64,
    pub epoch_time_s: f64,
    pub images_per_s: f64,
    /// Index into [`Speedup::series`].
    pub series: usize,
    /// This run's images/s / that series' base images/s.
    pub speedup: f64,
}

/// The data of Fig. 2.
#[derive(Clone, Debug, Default)]
pub(crate) struct Speedup {
    pub series: Vec<Series>,
    pub gpu: Vec<GpuRef>,
    /// Runs left out, with why.
    pub skipped: Vec<(String, String)>,
}

impl Speedup {
    /// Every series has a 1-rank run to normalise to.
    pub fn all_base_one(&self) -> bool {
        self.series.iter().all(|s| s.base_ranks == 1)
    }
}

/// A CPU device description without its thread count: "cpu (burn flex, 2 threads)" →
/// "cpu (burn flex)".
pub(crate) fn cpu_family(device: &str) -> String {
    let d = device.trim();
    match d.strip_prefix("cpu (").and_then(|r| r.strip_suffix(')')) {
        Some(inner) => {
            let kept: Vec<&str> = inner
                .split(", ")
                .filter(|p| !(p.ends_with(" thread") || p.ends_with(" threads")))
                .collect();
            format!("cpu ({})", kept.join(", "))
        }
        None => d.to_string(),
    }
}

/// Groups CPU runs by (device without thread count, workload) into series normalised to their 1-rank run (else
/// their smallest rank count), and expresses GPU runs against the series of the same workload
/// (else the series with the most runs).
pub(crate) fn speedup(runs: &[Run]) -> Speedup {
    let mut out = Speedup::default();
    let mut groups: Vec<((String, String), Vec<&Run>)> = Vec::new();
    let mut gpus = Vec::new();
    for r in runs {
        if !(r.images_per_s.is_finite() && r.images_per_s > 0.0) {
            out.skipped
                .push((r.label.clone(), "throughput (images/s) unknown".into()));
            continue;
        }
        match r.backend.as_str() {
            "cpu" => {
                if r.ranks == 0 {
                    out.skipped
                        .push((r.label.clone(), "rank count unknown".into()));
                    continue;
                }
                // Ranks on one host split its cores, so the thread count differs along a
                // series: it is not part of the series' identity.
                let key = (cpu_family(&r.device), r.workload.clone());
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, v)) => v.push(r),
                    None => groups.push((key, vec![r])),
                }
            }
            "gpu" => gpus.push(r),
            other => out.skipped.push((
                r.label.clone(),
                format!("backend {other:?} is neither cpu nor gpu"),
            )),
        }
    }
    for ((device, workload), members) in groups {
        let base_ranks = members.iter().map(|r| r.ranks).min().unwrap_or(1);
        let base_images_per_s = median(
            members
                .iter()
                .filter(|r| r.ranks == base_ranks)
                .map(|r| r.images_per_s),
        )
        .unwrap_or(f64::NAN);
        let mut points: Vec<SpeedupPoint> = members
            .iter()
            .map(|r| SpeedupPoint {
                label: r.label.clone(),
                ranks: r.ranks,
                epoch_time_s: r.epoch_time_s,
                images_per_s: r.images_per_s,
                speedup: r.images_per_s / base_images_per_s,
            })
            .collect();
        points.sort_by_key(|p| p.ranks);
        out.series.push(Series {
            device,
            workload,
            base_ranks,
            base_images_per_s,
            points,
        });
    }
    for g in gpus {
        let pick = out
            .series
            .iter()
            .enumerate()
            .filter(|(_, s)| !g.workload.is_empty() && s.workload == g.workload)
            .min_by_key(|(_, s)| (s.base_ranks, std::cmp::Reverse(s.points.len())))
            .or_else(|| {
                out.series
                    .iter()
                    .enumerate()
                    .max_by_key(|(i, s)| (s.points.len(), std::cmp::Reverse(*i)))
            })
            .map(|(i, _)| i);
        match pick {
            Some(i) => out.gpu.push(GpuRef {
                label: g.label.clone(),
                device: g.device.clone(),
                ranks: g.ranks,
                epoch_time_s: g.epoch_time_s,
                images_per_s: g.images_per_s,
                series: i,
                speedup: g.images_per_s / out.series[i].base_images_per_s,
            }),
            None => out
                .skipped
                .push((g.label.clone(), "no CPU run to compare with".into())),
        }
    }
    out
}

/// `speedup.csv`: every point of Fig. 2.
pub(crate) fn speedup_table(sp: &Speedup) -> Table {
    let mut t = Table::default();
    t.column("kind", "kind");
    t.column("run", "label");
    t.column("series (normalised to)", "series");
    t.column("device", "device");
    t.column("ranks", "ranks");
    t.column("epoch time (s)", "epoch_time_s");
    t.column("images/s", "images_per_s");
    t.column("base ranks", "base_ranks");
    t.column("base images/s", "base_images_per_s");
    t.column("speedup (images/s)", "speedup");
    t.column("ideal", "ideal_speedup");
    t.column("efficiency", "efficiency");
    for s in &sp.series {
        for p in &s.points {
            let ideal = p.ranks as f64 / s.base_ranks as f64;
            t.rows.push(vec![
                Cell::text("cpu"),
                Cell::text(p.label.clone()),
                Cell::text(s.name()),
                Cell {
                    csv: s.device.clone(),
                    text: short_device(&s.device),
                    numeric: false,
                },
                Cell::int(p.ranks),
                Cell::num(p.epoch_time_s, sig(p.epoch_time_s)),
                Cell::num(p.images_per_s, sig(p.images_per_s)),
                Cell::int(s.base_ranks),
                Cell::num(s.base_images_per_s, sig(s.base_images_per_s)),
                Cell::num(p.speedup, format!("{:.2}×", p.speedup)),
                Cell::num(ideal, format!("{ideal}×")),
                Cell::num(
                    p.speedup / ideal,
                    format!("{:.0} %", 100.0 * p.speedup / ideal),
                ),
            ]);
        }
    }
    for g in &sp.gpu {
        let s = &sp.series[g.series];
        t.rows.push(vec![
            Cell::text("gpu"),
            Cell::text(g.label.clone()),
            Cell::text(s.name()),
            Cell {
                csv: g.device.clone(),
                text: short_device(&g.device),
                numeric: false,
            },
            Cell::int(g.ranks),
            Cell::num(g.epoch_time_s, sig(g.epoch_time_s)),
            Cell::num(g.images_per_s, sig(g.images_per_s)),
            Cell::int(s.base_ranks),
            Cell::num(s.base_images_per_s, sig(s.base_images_per_s)),
            Cell::num(g.speedup, format!("{:.2}×", g.speedup)),
            Cell::opt(None),
            Cell::opt(None),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(i: u64, wall_s: f64, loss: f64) -> Step {
        Step {
            step: i,
            epoch: 1,
            wall_s,
            loss,
            ..Step::default()
        }
    }

    /// 20 steps 180 s apart (step i at wall_s = 180·i s = i/20 h) with loss −0.05·i.
    fn linear_steps() -> Vec<Step> {
        (1..=20)
            .map(|i| step(i, 180.0 * i as f64, -0.05 * i as f64))
            .collect()
    }

    #[test]
    fn report_time_to_loss_closed_form() {
        let steps = linear_steps();
        // The mean of the 5 losses ending at step i is −0.05·(i − 2) (the middle one, the
        // losses being linear in i). It is ≤ −0.75 first when i − 2 ≥ 15, i.e. at step 17,
        // at wall_s = 17·180 s = 0.85 h. (The raw loss crosses already at step 15.)
        let s = seconds_to_loss(&steps, -0.75, 5).expect("reached");
        assert!((s / 3600.0 - 0.85).abs() < 1e-9, "{s}");
        // ≤ −0.76: i − 2 ≥ 15.2 → step 18 → 0.9 h.
        let s = seconds_to_loss(&steps, -0.76, 5).expect("reached");
        assert!((s / 3600.0 - 0.9).abs() < 1e-9, "{s}");
        // Window 1 is the raw loss: step 15 → 0.75 h.
        let s = seconds_to_loss(&steps, -0.75, 1).expect("reached");
        assert!((s / 3600.0 - 0.75).abs() < 1e-9, "{s}");
    }

    #[test]
    fn report_time_to_target_not_reached() {
        let steps = linear_steps();
        // The last window (steps 16..20) averages −0.9: −0.95 is never reached.
        assert_eq!(seconds_to_loss(&steps, -0.95, 5), None);
        // Fewer steps than the window: never.
        assert_eq!(seconds_to_loss(&steps[..4], 0.0, 5), None);
        // A NaN inside a window does not count as crossing: at step 17, every window from the
        // crossing one (steps 13..17) to the last (16..20) holds it.
        let mut nan = steps.clone();
        nan[16].loss = f64::NAN;
        assert_eq!(seconds_to_loss(&nan, -0.75, 5), None);
        // At step 3 it only blanks the windows ending at steps 5..7: the crossing stays at 17.
        let mut nan = steps.clone();
        nan[2].loss = f64::NAN;
        assert_eq!(seconds_to_loss(&nan, -0.75, 5), Some(17.0 * 180.0));
        let vals = vec![
            Val {
                wall_s: 600.0,
                dice_liver: 0.5,
                ..Val::default()
            },
            Val {
                wall_s: 1800.0,
                dice_liver: 0.91,
                ..Val::default()
            },
        ];
        assert_eq!(seconds_to_dice(&vals, 0.9), Some(1800.0));
        assert_eq!(seconds_to_dice(&vals, 0.95), None);
        let hours = Cell::hours(None);
        assert_eq!(hours.csv, "not reached");
    }

    #[test]
    fn report_cpu_series_ignore_thread_counts() {
        // bench scaling gives 1 rank 2 threads and 2 ranks 1 thread each on a 2-core host.
        assert_eq!(cpu_family("cpu (burn flex, 2 threads)"), "cpu (burn flex)");
        assert_eq!(cpu_family("cpu (burn flex, 1 thread)"), "cpu (burn flex)");
        assert_eq!(cpu_family("gpu (burn wgpu, x)"), "gpu (burn wgpu, x)");
    }

    #[test]
    fn report_sig_digits_and_csv_quoting() {
        assert_eq!(sig(0.011111), "0.0111");
        assert_eq!(sig(1.234), "1.23");
        assert_eq!(sig(12.34), "12.3");
        assert_eq!(sig(1234.4), "1234");
        assert_eq!(sig(-0.75), "−0.750");
        assert_eq!(crate::util::csv_field("a,b"), "\"a,b\"");
        assert_eq!(crate::util::csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(html_escape("<a&b>"), "&lt;a&amp;b&gt;");
        assert_eq!(target_text(-0.75), "−0.75");
    }
}
