//! Study report: turns training run directories into the study's exhibits — throughput
//! speedup against ranks (Fig. 2), training loss (Fig. 3) and validation Dice (Fig. 4) against
//! wall time, time to target (Table 1), a per-run table (`runs.csv`) and an `index.html` that
//! shows them all.
//!
//! Run directories are read leniently (fields missing from older `summary.json` files take
//! defaults, unknown ones are ignored, a torn last line of `metrics.jsonl` is skipped), so a run
//! that is still going or crashed is plotted from its metrics alone.

mod plot;
mod runs;
mod tables;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::util::fs::write_atomic;

use plot::{DiceCurve, DiceFigure, Figure, LossCurve, LossFigure, SpeedupFigure};
use runs::Run;
use tables::{Table, html_escape, target_text};

/// What to measure and how to title the report.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportOptions {
    /// Training-loss targets (the loss is −Dice: lower is better); one Table 1 column each.
    pub loss_targets: Vec<f64>,
    /// Validation liver Dice target (in [0, 1]).
    pub dice_target: f64,
    /// Title of `index.html`.
    pub title: String,
}

impl Default for ReportOptions {
    fn default() -> Self {
        Self {
            loss_targets: vec![-0.75, -0.76],
            dice_target: 0.9,
            title: "ctseg training report".into(),
        }
    }
}

/// What [`report`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportOutput {
    /// Every file written, in `out_dir`.
    pub files: Vec<PathBuf>,
    /// Run directories read.
    pub runs: usize,
}

/// Reads the run directories and writes the report into `out_dir` (created if needed; every
/// file written atomically): `speedup.{png,svg,csv}`, `loss.{png,svg}`, `dice.{png,svg}`,
/// `time_to_target.{md,csv}`, `runs.csv` and `index.html`.
pub fn report(run_dirs: &[PathBuf], out_dir: &Path, o: &ReportOptions) -> Result<ReportOutput> {
    check_options(o)?;
    if run_dirs.is_empty() {
        return Err(Error::Argument(
            "report: no run directories given".to_string(),
        ));
    }
    refuse_repeated_runs(run_dirs)?;
    let mut runs = run_dirs
        .iter()
        .map(|d| runs::load_run(d))
        .collect::<Result<Vec<Run>>>()?;
    unique_labels(&mut runs);
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;

    let mut files = Vec::new();
    let title = if o.title.trim().is_empty() {
        ReportOptions::default().title
    } else {
        o.title.trim().to_string()
    };

    // Fig. 2.
    let sp = tables::speedup(&runs);
    write_figure(
        out_dir,
        "speedup",
        &SpeedupFigure {
            data: &sp,
            title: "Scaling: throughput (images/s) speedup against ranks".into(),
        },
        &mut files,
    )?;
    let speedup_table = tables::speedup_table(&sp);
    put(
        out_dir,
        "speedup.csv",
        speedup_table.to_csv().as_bytes(),
        &mut files,
    )?;

    // Fig. 3.
    let loss = LossFigure {
        curves: runs
            .iter()
            .map(|r| LossCurve {
                label: r.label.clone(),
                raw: r.metrics.steps.iter().map(|s| (s.wall_s, s.loss)).collect(),
                smooth: tables::moving_average(&r.metrics.steps, tables::LOSS_WINDOW),
            })
            .collect(),
        targets: o.loss_targets.clone(),
        window: tables::LOSS_WINDOW,
        title: "Training loss against wall time".into(),
    };
    write_figure(out_dir, "loss", &loss, &mut files)?;

    // Fig. 4.
    let dice = DiceFigure {
        curves: runs
            .iter()
            .map(|r| DiceCurve {
                label: r.label.clone(),
                liver: r
                    .metrics
                    .vals
                    .iter()
                    .map(|v| (v.wall_s, v.dice_liver))
                    .collect(),
                tumour: r
                    .metrics
                    .vals
                    .iter()
                    .map(|v| (v.wall_s, v.dice_tumour))
                    .collect(),
            })
            .collect(),
        target: o.dice_target,
        title: "Validation Dice against wall time".into(),
    };
    write_figure(out_dir, "dice", &dice, &mut files)?;

    // Table 1 and the run table.
    let t1 = tables::time_to_target(&runs, &o.loss_targets, o.dice_target);
    let caption = tables::time_to_target_caption();
    put(
        out_dir,
        "time_to_target.csv",
        t1.to_csv().as_bytes(),
        &mut files,
    )?;
    let md = format!(
        "# Table 1. Time to target\n\n{caption}\n\n{}",
        t1.to_markdown()
    );
    put(out_dir, "time_to_target.md", md.as_bytes(), &mut files)?;
    let rt = tables::runs_table(&runs);
    put(out_dir, "runs.csv", rt.to_csv().as_bytes(), &mut files)?;

    let html = index_html(&title, &runs, &sp, &speedup_table, &t1, &caption, &rt, o);
    put(out_dir, "index.html", html.as_bytes(), &mut files)?;

    Ok(ReportOutput {
        files,
        runs: runs.len(),
    })
}

fn check_options(o: &ReportOptions) -> Result<()> {
    if let Some(t) = o.loss_targets.iter().find(|t| !t.is_finite()) {
        return Err(Error::Argument(format!(
            "--loss-targets: {t} is not a finite number"
        )));
    }
    if let Some(t) = crate::util::first_repeat(&o.loss_targets) {
        return Err(Error::Argument(format!(
            "--loss-targets: {t} is given twice; give each target once"
        )));
    }
    if !(o.dice_target.is_finite() && (0.0..=1.0).contains(&o.dice_target)) {
        return Err(Error::Argument(format!(
            "--dice-target: {} is not a number in [0, 1]",
            o.dice_target
        )));
    }
    Ok(())
}

/// A run directory given twice (directly, or also through a folder of runs) would be drawn and
/// tabulated twice as two runs; directories are compared as the file system resolves them. One
/// that cannot be resolved is left to the reader, which names it.
fn refuse_repeated_runs(run_dirs: &[PathBuf]) -> Result<()> {
    let mut seen: Vec<(PathBuf, &PathBuf)> = Vec::new();
    for d in run_dirs {
        let Ok(real) = d.canonicalize() else { continue };
        if let Some((_, first)) = seen.iter().find(|(r, _)| *r == real) {
            return Err(Error::Argument(format!(
                "report: {} and {} are the same run directory; give each run once (a folder of runs stands for all of them)",
                first.display(),
                d.display()
            )));
        }
        seen.push((real, d));
    }
    Ok(())
}

/// Appends " (2)", " (3)", … to repeated labels so that legends tell runs apart.
fn unique_labels(runs: &mut [Run]) {
    let mut seen: Vec<String> = Vec::new();
    for r in runs.iter_mut() {
        let mut label = r.label.clone();
        let mut n = 2;
        while seen.contains(&label) {
            label = format!("{} ({n})", r.label);
            n += 1;
        }
        seen.push(label.clone());
        r.label = label;
    }
}

/// Writes `out_dir/name` atomically and records it.
fn put(out_dir: &Path, name: &str, bytes: &[u8], files: &mut Vec<PathBuf>) -> Result<()> {
    let path = out_dir.join(name);
    write_atomic(&path, bytes)?;
    files.push(path);
    Ok(())
}

/// Writes `stem.png` and `stem.svg`.
fn write_figure(
    out_dir: &Path,
    stem: &str,
    fig: &impl Figure,
    files: &mut Vec<PathBuf>,
) -> Result<()> {
    let png_name = format!("{stem}.png");
    let png = plot::render_png(fig).map_err(|e| {
        Error::Invalid(format!(
            "{}: drawing the figure: {e}",
            out_dir.join(&png_name).display()
        ))
    })?;
    put(out_dir, &png_name, &png, files)?;
    let svg_name = format!("{stem}.svg");
    let svg = plot::render_svg(fig).map_err(|e| {
        Error::Invalid(format!(
            "{}: drawing the figure: {e}",
            out_dir.join(&svg_name).display()
        ))
    })?;
    put(out_dir, &svg_name, svg.as_bytes(), files)
}

const STYLE: &str = "body{font-family:'DejaVu Sans',Verdana,sans-serif;max-width:1240px;margin:1.5em auto;padding:0 1em;color:#222;line-height:1.45}\
h1{font-size:1.7em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ccc}\
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #ddd}\
figcaption,p.caption{color:#444;font-size:.95em}\
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:.9em;margin:.5em 0}\
th,td{border:1px solid #bbb;padding:.25em .6em;vertical-align:top}th{background:#f2f2f2;text-align:left}\
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}code{font-size:.92em}";

/// The self-contained `index.html` (relative links only).
#[allow(clippy::too_many_arguments)]
fn index_html(
    title: &str,
    runs: &[Run],
    sp: &tables::Speedup,
    speedup_table: &Table,
    t1: &Table,
    t1_caption: &str,
    rt: &Table,
    o: &ReportOptions,
) -> String {
    let e = html_escape;
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    h.push_str(&format!(
        "<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        e(title)
    ));
    h.push_str(&format!("<h1>{}</h1>\n", e(title)));
    h.push_str(&format!(
        "<p>{} run(s), read by ctseg {}. Figures link to their SVG; tables are also in \
         <a href=\"time_to_target.csv\">time_to_target.csv</a>, \
         <a href=\"time_to_target.md\">time_to_target.md</a>, \
         <a href=\"speedup.csv\">speedup.csv</a> and <a href=\"runs.csv\">runs.csv</a>.</p>\n",
        runs.len(),
        env!("CARGO_PKG_VERSION")
    ));

    let base = if sp.series.is_empty() || sp.all_base_one() {
        "its 1-rank run".to_string()
    } else {
        "its smallest rank count (there is no 1-rank run)".to_string()
    };
    let mut fig2 = e(&format!(
        "Speedup in throughput (training images per second) with ranks, both axes on a log \
         scale. It is not the ratio of epoch times: an epoch drops its last incomplete global \
         batch, so epochs at different rank counts hold different numbers of images (epoch times \
         are in runs.csv). CPU runs on one device with one workload form a series, normalised to \
         {base}; markers are runs (labelled with the median speedup at each rank count), the \
         dashed line is ideal linear speedup. Each GPU run is a horizontal line at its images/s ÷ \
         the series' base images/s. Images/s: the summary's, else the global batch ÷ the median \
         step time from metrics.jsonl."
    ));
    if !sp.skipped.is_empty() {
        let list: Vec<String> = sp
            .skipped
            .iter()
            .map(|(l, why)| format!("{} ({})", e(l), e(why)))
            .collect();
        fig2.push_str(&format!(" Not shown: {}.", list.join("; ")));
    }
    h.push_str(&figure_html("Figure 2. Scaling", "speedup", &fig2));
    h.push_str(&format!(
        "<div class=\"scroll\">{}</div>\n",
        speedup_table.to_html()
    ));

    let targets: Vec<String> = o.loss_targets.iter().map(|&t| target_text(t)).collect();
    h.push_str(&figure_html(
        "Figure 3. Training loss",
        "loss",
        &e(&format!(
            "Training loss (−Dice, lower is better) against wall time, one colour per run: bold \
             the mean of the last {} steps, faint every step; dashed: the loss targets ({}).",
            tables::LOSS_WINDOW,
            targets.join(", ")
        )),
    ));
    h.push_str(&figure_html(
        "Figure 4. Validation Dice",
        "dice",
        &e(&format!(
            "Hard validation Dice (threshold 0.5, true/false positives summed over the validation \
             set) against wall time: liver (liver ∪ tumour) solid with circles, tumour dashed with \
             triangles; dashed grey: the liver target {}.",
            target_text(o.dice_target)
        )),
    ));

    h.push_str("<h2>Table 1. Time to target</h2>\n");
    h.push_str(&format!("<p class=\"caption\">{}</p>\n", e(t1_caption)));
    h.push_str(&format!("<div class=\"scroll\">{}</div>\n", t1.to_html()));
    h.push_str(
        "<h2>Runs</h2>\n<p class=\"caption\">Every summary number, and the per-step medians \
        of the step's parts (warm-up steps skipped); — where a run does not record it.</p>\n",
    );
    h.push_str(&format!("<div class=\"scroll\">{}</div>\n", rt.to_html()));
    h.push_str("<h2>Run directories</h2>\n<ul>\n");
    for r in runs {
        let status = if r.has_summary {
            ""
        } else {
            " (no summary.json: running or crashed)"
        };
        h.push_str(&format!(
            "<li>{}: <code>{}</code>{}</li>\n",
            e(&r.label),
            e(&r.dir.display().to_string()),
            e(status)
        ));
    }
    h.push_str("</ul>\n</body>\n</html>\n");
    h
}

/// A figure block: the PNG linking to the SVG, with an (already escaped) caption.
fn figure_html(heading: &str, stem: &str, caption_html: &str) -> String {
    format!(
        "<h2>{}</h2>\n<figure>\n<a href=\"{stem}.svg\"><img src=\"{stem}.png\" width=\"{}\" height=\"{}\" alt=\"{}\"></a>\n<figcaption>{caption_html}</figcaption>\n</figure>\n",
        html_escape(heading),
        plot::WIDTH,
        plot::HEIGHT,
        html_escape(heading),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a run directory: `steps` steps `step_s` apart with a linearly falling loss, a
    /// validation after each `val_every` steps, and a summary unless `summary` is `None`.
    fn fake_run(
        root: &Path,
        name: &str,
        summary: Option<serde_json::Value>,
        steps: u64,
        step_s: f64,
    ) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut m = String::new();
        for i in 1..=steps {
            let rec = serde_json::json!({
                "kind": "step", "step": i, "epoch": 1 + (i - 1) / 10, "wall_s": step_s * i as f64,
                "loss": -0.3 - 0.6 * (i as f64 / steps as f64), "lr": 1e-3, "images_per_s": 8.0 / step_s,
                "data_wait_s": 0.001, "compute_s": 0.9 * step_s, "copy_s": 0.0, "comm_s": 0.0,
                "comm_total_s": 0.0
            });
            m.push_str(&rec.to_string());
            m.push('\n');
            if i % 10 == 0 {
                let v = serde_json::json!({
                    "kind": "val", "epoch": i / 10, "step": i, "wall_s": step_s * i as f64 + 0.5,
                    "val_loss": -0.5, "dice_liver": (i as f64 / steps as f64).min(0.95),
                    "dice_tumour": 0.3 * i as f64 / steps as f64, "soft_dice": [0.9, 0.5, 0.2],
                    "images": 16
                });
                m.push_str(&v.to_string());
                m.push('\n');
            }
        }
        std::fs::write(dir.join("metrics.jsonl"), m).expect("write metrics");
        std::fs::write(
            dir.join("config.resolved.toml"),
            "seed = 1\n[model]\nwidth = 16\ndepth = 4\ninput_size = 128\n[train]\nbatch_size = 8\n",
        )
        .expect("write config");
        if let Some(s) = summary {
            std::fs::write(dir.join("summary.json"), s.to_string()).expect("write summary");
        }
        dir
    }

    fn cpu_summary(ranks: u64, epoch_time_s: f64) -> serde_json::Value {
        serde_json::json!({
            "steps": 40, "epochs": 4.0, "world_size": ranks, "global_batch": 8 * ranks,
            "wall_s": 4.0 * epoch_time_s, "images_per_s": 80.0 / epoch_time_s,
            "device": "cpu (burn flex, 2 threads)", "epoch_time_s": epoch_time_s,
            "steps_per_epoch": 10, "peak_rss_mb": 512.0, "backend": "cpu"
        })
    }

    /// CPU runs at 1, 2 and 4 ranks with epoch times 100, 55 and 30 s and a GPU run of 20 s.
    fn scaling_runs(root: &Path) -> Vec<PathBuf> {
        let mut dirs = vec![
            fake_run(root, "cpu1", Some(cpu_summary(1, 100.0)), 40, 10.0),
            fake_run(root, "cpu2", Some(cpu_summary(2, 55.0)), 40, 5.5),
            fake_run(root, "cpu4", Some(cpu_summary(4, 30.0)), 40, 3.0),
        ];
        let mut gpu = serde_json::json!({
            "steps": 40, "epochs": 4.0, "world_size": 1, "global_batch": 8, "wall_s": 80.0,
            "device": "gpu (burn wgpu, adapter [0] NVIDIA H100 80GB HBM3, DiscreteGpu, Vulkan)",
            "epoch_time_s": 20.0, "label": "h100 <fast>"
        });
        // No "backend": it is derived from the device string.
        if let Some(o) = gpu.as_object_mut() {
            o.remove("backend");
        }
        dirs.push(fake_run(root, "gpu", Some(gpu), 40, 2.0));
        dirs
    }

    fn csv_rows(path: &Path) -> Vec<Vec<String>> {
        let text = std::fs::read_to_string(path).expect("read csv");
        // The test fields hold no quoted commas except the series name, which is quoted.
        text.lines()
            .map(|l| {
                let mut out = Vec::new();
                let mut cur = String::new();
                let mut quoted = false;
                for c in l.chars() {
                    match c {
                        '"' => quoted = !quoted,
                        ',' if !quoted => out.push(std::mem::take(&mut cur)),
                        _ => cur.push(c),
                    }
                }
                out.push(cur);
                out
            })
            .collect()
    }

    fn col(rows: &[Vec<String>], row: usize, name: &str) -> String {
        let i = rows[0]
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no column {name} in {:?}", rows[0]));
        rows[row][i].clone()
    }

    #[test]
    fn report_speedup_normalisation() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs = scaling_runs(tmp.path());
        let out = tmp.path().join("report");
        let r = report(&dirs, &out, &ReportOptions::default()).expect("report");
        assert_eq!(r.runs, 4);
        let rows = csv_rows(&out.join("speedup.csv"));
        assert_eq!(rows.len(), 5, "header, 3 CPU points, 1 GPU line: {rows:?}");
        let num = |row: usize, name: &str| -> f64 {
            col(&rows, row, name)
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("{name} row {row}: {e}"))
        };
        // 80 images per epoch at every rank count: speedup = images/s over the 1-rank run's
        // 0.8 = 100 s / epoch time; ideal = ranks / 1; efficiency = speedup / ideal.
        for (row, ranks, speedup) in [
            (1, 1.0, 1.0),
            (2, 2.0, 100.0 / 55.0),
            (3, 4.0, 100.0 / 30.0),
        ] {
            assert_eq!(col(&rows, row, "kind"), "cpu");
            assert_eq!(num(row, "ranks"), ranks);
            assert_eq!(num(row, "base_ranks"), 1.0);
            assert_eq!(num(row, "base_images_per_s"), 0.8);
            assert!((num(row, "speedup") - speedup).abs() < 1e-12);
            assert!((num(row, "efficiency") - speedup / ranks).abs() < 1e-12);
        }
        assert_eq!(col(&rows, 4, "kind"), "gpu");
        assert_eq!(col(&rows, 4, "label"), "h100 <fast>");
        // The GPU run's images/s come from its metrics: 8 images per 2 s step = 4 = 5 × 0.8.
        assert!((num(4, "speedup") - 5.0).abs() < 1e-12, "4 / 0.8 images/s");

        // Without the 1-rank run the series is normalised to 2 ranks, and the axis says so.
        let out2 = tmp.path().join("report2");
        report(&dirs[1..], &out2, &ReportOptions::default()).expect("report");
        let rows = csv_rows(&out2.join("speedup.csv"));
        assert_eq!(col(&rows, 1, "base_ranks"), "2");
        assert!((num_of(&rows, 2, "speedup") - 55.0 / 30.0).abs() < 1e-12);
        assert!((num_of(&rows, 2, "ideal_speedup") - 2.0).abs() < 1e-12);
        let svg = std::fs::read_to_string(out2.join("speedup.svg")).expect("svg");
        assert!(
            svg.contains("2-rank CPU run (no 1-rank run"),
            "axis label names the base"
        );
    }

    fn num_of(rows: &[Vec<String>], row: usize, name: &str) -> f64 {
        col(rows, row, name).parse::<f64>().unwrap_or(f64::NAN)
    }

    #[test]
    fn report_writes_files_png_and_svg() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut dirs = scaling_runs(tmp.path());
        // A run without summary.json (crashed), with a torn last line: plotted from its metrics.
        let crashed = fake_run(tmp.path(), "crashed", None, 25, 4.0);
        let mp = crashed.join("metrics.jsonl");
        let mut text = std::fs::read_to_string(&mp).expect("read");
        text.push_str("{\"kind\":\"step\",\"step\":26,\"wa");
        std::fs::write(&mp, text).expect("write");
        dirs.push(crashed);
        let out = tmp.path().join("out");
        let o = ReportOptions {
            loss_targets: vec![-0.75, -0.76],
            dice_target: 0.9,
            title: "Test <report> & co".into(),
        };
        let r = report(&dirs, &out, &o).expect("report");
        assert_eq!(r.runs, 5);
        for name in [
            "speedup.png",
            "speedup.svg",
            "speedup.csv",
            "loss.png",
            "loss.svg",
            "dice.png",
            "dice.svg",
            "time_to_target.md",
            "time_to_target.csv",
            "runs.csv",
            "index.html",
        ] {
            let p = out.join(name);
            assert!(p.is_file(), "{name} missing");
            assert!(r.files.contains(&p), "{name} not listed");
        }
        for stem in ["speedup", "loss", "dice"] {
            let f = std::fs::File::open(out.join(format!("{stem}.png"))).expect("open png");
            let mut reader = png::Decoder::new(std::io::BufReader::new(f))
                .read_info()
                .expect("png header");
            let mut buf = vec![0; reader.output_buffer_size()];
            let info = reader.next_frame(&mut buf).expect("png data");
            assert_eq!((info.width, info.height), (plot::WIDTH, plot::HEIGHT));
            let px = &buf[..info.buffer_size()];
            let first = &px[..3];
            assert!(
                px.chunks(3).any(|c| c != first),
                "{stem}.png is a single colour"
            );
            // Some coloured (not grey) pixels: the series were drawn.
            assert!(
                px.chunks(3)
                    .any(|c| c[0].abs_diff(c[1]) > 60 || c[1].abs_diff(c[2]) > 60),
                "{stem}.png has no coloured pixels"
            );
        }
        let svg = |n: &str| std::fs::read_to_string(out.join(n)).expect("svg");
        let s = svg("speedup.svg");
        assert!(s.contains("ranks (MPI processes, log scale)"));
        assert!(s.contains("speedup in throughput (images/s) over the 1-rank CPU run"));
        assert!(
            s.contains("GPU: NVIDIA H100 80GB HBM3"),
            "GPU line labelled with its device"
        );
        let s = svg("loss.svg");
        assert!(s.contains("wall time (minutes)") && s.contains("training loss (−Dice"));
        let s = svg("dice.svg");
        assert!(s.contains("validation Dice") && s.contains("crashed: tumour"));

        let html = std::fs::read_to_string(out.join("index.html")).expect("html");
        assert!(html.contains("<title>Test &lt;report&gt; &amp; co</title>"));
        assert!(html.contains("h100 &lt;fast&gt;") && !html.contains("h100 <fast>"));
        assert!(html.contains("<a href=\"speedup.svg\"><img src=\"speedup.png\""));
        assert!(html.contains("no summary.json"));

        // Table 1: the crashed run's loss −0.3 − 0.6·i/25 has a 5-step mean of
        // −0.3 − 0.6·(i − 2)/25, ≤ −0.75 first when i − 2 ≥ 18.75, i.e. step 21, at
        // 21 · 4 s = 84 s = 0.023333 h; −0.76 needs i − 2 ≥ 19.17: step 22, 88 s. Its best
        // liver Dice is 20/25 = 0.8 (vals at steps 10 and 20): the 0.9 target is not reached.
        let rows = csv_rows(&out.join("time_to_target.csv"));
        let crashed_row = rows
            .iter()
            .position(|r| r[0] == "crashed")
            .expect("crashed row");
        assert_eq!(
            col(&rows, crashed_row, "hours_to_loss_le_-0.75"),
            "0.023333"
        );
        assert_eq!(
            col(&rows, crashed_row, "hours_to_loss_le_-0.76"),
            "0.024444"
        );
        assert_eq!(
            col(&rows, crashed_row, "hours_to_dice_liver_ge_0.9"),
            "not reached"
        );
        let md = std::fs::read_to_string(out.join("time_to_target.md")).expect("md");
        assert!(md.contains("hours to loss ≤ −0.75") && md.contains("moving average"));
        let runs_rows = csv_rows(&out.join("runs.csv"));
        assert_eq!(runs_rows.len(), 6);
        let c = runs_rows
            .iter()
            .position(|r| r[0] == "crashed")
            .expect("crashed row");
        assert_eq!(col(&runs_rows, c, "torn_last_line"), "yes");
        // Its step time (4 s) and epoch (10 steps, epoch 2 reached) come from the metrics.
        assert_eq!(col(&runs_rows, c, "median_step_s"), "4");
        assert_eq!(col(&runs_rows, c, "epoch_time_s"), "40");
        assert_eq!(col(&runs_rows, c, "global_batch"), "8");
        assert_eq!(col(&runs_rows, c, "median_compute_s"), "3.6");
    }

    #[test]
    fn report_bad_dir_names_the_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let empty = tmp.path().join("not-a-run");
        std::fs::create_dir_all(&empty).expect("mkdir");
        let e = report(
            std::slice::from_ref(&empty),
            &tmp.path().join("out"),
            &ReportOptions::default(),
        )
        .expect_err("empty dir")
        .to_string();
        assert!(e.contains("not-a-run"), "{e}");
        let missing = tmp.path().join("missing-run");
        let e = report(
            &[missing],
            &tmp.path().join("out"),
            &ReportOptions::default(),
        )
        .expect_err("missing dir")
        .to_string();
        assert!(e.contains("missing-run"), "{e}");
        let e = report(&[], &tmp.path().join("out"), &ReportOptions::default())
            .expect_err("no dirs")
            .to_string();
        assert!(e.contains("no run directories"), "{e}");
        let o = ReportOptions {
            dice_target: 1.5,
            ..ReportOptions::default()
        };
        let e = report(&[empty], &tmp.path().join("out"), &o)
            .expect_err("bad target")
            .to_string();
        assert!(e.contains("--dice-target"), "{e}");
    }

    #[test]
    fn report_duplicate_labels_are_numbered() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = cpu_summary(1, 10.0);
        let mut a = s.clone();
        a["label"] = "same".into();
        let dirs = vec![
            fake_run(tmp.path(), "a", Some(a.clone()), 12, 1.0),
            fake_run(tmp.path(), "b", Some(a), 12, 1.0),
        ];
        let out = tmp.path().join("out");
        report(&dirs, &out, &ReportOptions::default()).expect("report");
        let rows = csv_rows(&out.join("runs.csv"));
        assert_eq!(rows[1][0], "same");
        assert_eq!(rows[2][0], "same (2)");
    }
}
