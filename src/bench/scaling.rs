//! `ctseg bench scaling`: trains the same config at several rank counts and backends through a
//! launcher template (`mpirun -np {n} …`, `srun -n {n} …`, the emulated-hosts script), one run
//! directory each, and gathers epoch time, images/s, the per-step split and peak memory into
//! `scaling.json`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rundir::{RunDir, Summary, metrics};
use crate::util::stats::warm_median;

/// The file `bench scaling` writes in its output directory.
pub const RESULTS: &str = "scaling.json";

/// What to run.
#[derive(Clone, Debug)]
pub struct ScalingOptions {
    /// The ctseg executable each rank runs.
    pub exe: PathBuf,
    /// Run config file.
    pub config: PathBuf,
    /// Dataset directory (phantoms when `None`).
    pub data: Option<PathBuf>,
    /// Rank counts of the CPU series.
    pub ranks: Vec<usize>,
    /// Rank counts of GPU runs (usually `[1]`).
    pub gpu_ranks: Vec<usize>,
    /// Backends.
    pub backends: Vec<crate::backend::BackendKind>,
    /// Launcher template; `{n}` becomes the rank count. Empty: 1-rank runs start ctseg directly.
    pub launcher: String,
    /// Output directory: one run directory per (backend, ranks), and `scaling.json`.
    pub out: PathBuf,
    /// Extra arguments for `ctseg train` (e.g. `--max-steps 20`, `--threads 1`).
    pub train_args: Vec<String>,
    /// A run that takes longer is killed and reported as failed, s.
    pub timeout_s: f64,
}

/// One run of the series.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScalingRow {
    /// `"cpu"` or `"gpu"`.
    pub backend: String,
    /// Ranks.
    pub ranks: usize,
    /// Run directory.
    pub run_dir: PathBuf,
    /// The command that ran.
    pub command: String,
    /// Device description.
    pub device: String,
    /// Global batch.
    pub global_batch: usize,
    /// Optimiser steps per epoch.
    pub steps_per_epoch: u64,
    /// Median step time (warm), s.
    pub median_step_s: f64,
    /// Epoch time = steps per epoch × median step, s.
    pub epoch_time_s: f64,
    /// Images per second at the median step.
    pub images_per_s: f64,
    /// Median per-step compute (forward, loss, backward), s.
    pub compute_s: f64,
    /// Median per-step gradient copy off the device, s.
    pub copy_s: f64,
    /// Median per-step exposed communication, s.
    pub comm_s: f64,
    /// Median per-step loader wait, s.
    pub data_wait_s: f64,
    /// Largest peak RSS of any rank, MB.
    pub peak_rss_mb: f64,
    /// Speedup in throughput (images per second) against the 1-rank run of the same backend
    /// (NaN without one). Not from epoch times: the trainer drops an epoch's last incomplete
    /// global batch, so epochs at different rank counts hold different numbers of images.
    pub speedup: f64,
    /// Parallel efficiency: speedup / ranks.
    pub efficiency: f64,
    /// Last training loss.
    pub final_loss: f64,
    /// Last validation liver Dice.
    pub dice_liver: f64,
    /// Wall time of the whole launch (start-up, validation, checkpoints included), s.
    pub launch_s: f64,
}

impl ScalingRow {
    /// One line for a terminal, as each run finishes.
    pub fn render(&self) -> String {
        format!(
            "{} × {}: epoch {:.1} s ({} steps × {:.3} s), {:.2} img/s, compute {:.3} s, copy {:.3} s, exposed comm {:.3} s, peak RSS {:.0} MB, launch {:.1} s",
            self.backend,
            self.ranks,
            self.epoch_time_s,
            self.steps_per_epoch,
            self.median_step_s,
            self.images_per_s,
            self.compute_s,
            self.copy_s,
            self.comm_s,
            self.peak_rss_mb,
            self.launch_s
        )
    }
}

/// Per-step medians of a run directory's `metrics.jsonl`: (compute, copy, comm, data wait),
/// with the same warm-up rule as the summary's median step.
pub fn step_split(run_dir: &Path) -> Result<[f64; 4]> {
    let m = metrics::read(&RunDir::new(run_dir).metrics())?;
    let col = |f: fn(&metrics::StepRecord) -> Option<f64>| {
        warm_median(m.steps.iter().map(|s| f(s).unwrap_or(f64::NAN))).unwrap_or(f64::NAN)
    };
    Ok([
        col(|s| s.compute_s),
        col(|s| s.copy_s),
        col(|s| s.comm_s),
        col(|s| s.data_wait_s),
    ])
}

/// Reads a run directory's `summary.json`.
pub fn read_summary(run_dir: &Path) -> Result<Summary> {
    Summary::read(&RunDir::new(run_dir).summary())
}

/// The argument vector of one launch: the launcher template with `{n}` replaced, then ctseg.
pub fn launch_argv(
    o: &ScalingOptions,
    backend: &str,
    ranks: usize,
    run_dir: &Path,
) -> Result<Vec<String>> {
    let mut argv: Vec<String> = Vec::new();
    if !(o.launcher.trim().is_empty() && ranks == 1) {
        if o.launcher.trim().is_empty() {
            return Err(Error::Argument(format!(
                "{ranks} ranks need a launcher: pass --launcher 'mpirun -np {{n}}' (or srun, or scripts/emulate_hosts.sh)"
            )));
        }
        if !o.launcher.contains("{n}") {
            return Err(Error::Argument(format!(
                "--launcher '{}' has no {{n}} for the rank count",
                o.launcher
            )));
        }
        argv.extend(
            o.launcher
                .split_whitespace()
                .map(|w| w.replace("{n}", &ranks.to_string())),
        );
    }
    argv.push(o.exe.display().to_string());
    argv.extend(
        [
            "train",
            "--config",
            &o.config.display().to_string(),
            "--out",
            &run_dir.display().to_string(),
            "--backend",
            backend,
            "--label",
            &format!("{backend} × {ranks}"),
            "--quiet",
        ]
        .map(String::from),
    );
    if let Some(d) = &o.data {
        argv.push("--data".into());
        argv.push(d.display().to_string());
    }
    argv.extend(o.train_args.iter().cloned());
    Ok(argv)
}

fn run_one(argv: &[String], log: &Path, timeout: Duration) -> Result<f64> {
    let file = std::fs::File::create(log).map_err(|e| Error::io(log, e))?;
    let err = file.try_clone().map_err(|e| Error::io(log, e))?;
    let t = Instant::now();
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(|e| Error::io(Path::new(&argv[0]), e))?;
    loop {
        match child.try_wait().map_err(|e| Error::io(log, e))? {
            Some(status) if status.success() => return Ok(t.elapsed().as_secs_f64()),
            Some(status) => {
                return Err(Error::Invalid(format!(
                    "`{}` failed ({status}); its output is in {}",
                    argv.join(" "),
                    log.display()
                )));
            }
            None if t.elapsed() > timeout => {
                // Ends the launcher; mpirun takes its ranks down with it.
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Invalid(format!(
                    "`{}` ran past {:.0} s and was killed; its output is in {}",
                    argv.join(" "),
                    timeout.as_secs_f64(),
                    log.display()
                )));
            }
            None => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A row from a finished run directory (`speedup` filled in later by [`fill_speedups`]).
pub fn row_from_run(
    backend: &str,
    ranks: usize,
    run_dir: &Path,
    command: String,
    launch_s: f64,
) -> Result<ScalingRow> {
    let s = read_summary(run_dir)?;
    let [compute_s, copy_s, comm_s, data_wait_s] = step_split(run_dir)?;
    Ok(ScalingRow {
        backend: backend.to_string(),
        ranks,
        run_dir: run_dir.to_path_buf(),
        command,
        device: s.device.clone(),
        global_batch: s.global_batch as usize,
        steps_per_epoch: s.steps_per_epoch,
        median_step_s: s.median_step_s,
        epoch_time_s: s.epoch_time_s,
        images_per_s: s.global_batch as f64 / s.median_step_s,
        compute_s,
        copy_s,
        comm_s,
        data_wait_s,
        peak_rss_mb: s.peak_rss_mb,
        speedup: f64::NAN,
        efficiency: f64::NAN,
        final_loss: s.final_loss,
        dice_liver: s.dice_liver,
        launch_s,
    })
}

/// Speedup of each row's throughput (images per second) against the 1-rank row of its backend.
pub fn fill_speedups(rows: &mut [ScalingRow]) {
    let base: Vec<(String, f64)> = rows
        .iter()
        .filter(|r| r.ranks == 1)
        .map(|r| (r.backend.clone(), r.images_per_s))
        .collect();
    for r in rows.iter_mut() {
        if let Some((_, ips1)) = base.iter().find(|(b, _)| *b == r.backend) {
            r.speedup = r.images_per_s / ips1;
            r.efficiency = r.speedup / r.ranks as f64;
        }
    }
}

/// One launch of the series, planned before any starts.
struct Launch {
    backend: &'static str,
    ranks: usize,
    run_dir: PathBuf,
    argv: Vec<String>,
}

impl ScalingOptions {
    fn timeout(&self) -> Result<Duration> {
        Duration::try_from_secs_f64(self.timeout_s)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| {
                Error::Argument(format!(
                    "--timeout-s {}: expected a positive number of seconds",
                    self.timeout_s
                ))
            })
    }

    /// Every launch, checked before the first starts: a rank count of 0 or one given twice, a
    /// count the launcher cannot start and a run directory left by an earlier series are refused
    /// here, so that a series never fails halfway through on its own arguments.
    fn plan(&self) -> Result<Vec<Launch>> {
        // `launch_argv` passes these itself; given again after `--`, every run would fail.
        const OWN: [&str; 6] = [
            "--config",
            "--out",
            "--backend",
            "--label",
            "--quiet",
            "--data",
        ];
        if let Some(a) = self.train_args.iter().find(|a| {
            let flag = a.split('=').next().unwrap_or(a);
            OWN.contains(&flag)
        }) {
            return Err(Error::Argument(format!(
                "`{a}` after `--`: bench scaling passes {} to every run itself",
                OWN.join(", ")
            )));
        }
        let mut plan = Vec::new();
        for (i, kind) in self.backends.iter().enumerate() {
            let backend = kind.name();
            if self.backends[..i].contains(kind) {
                return Err(Error::Argument(format!(
                    "--backends lists {backend} twice: each backend is one series"
                )));
            }
            let (flag, counts) = if *kind == crate::backend::BackendKind::Gpu {
                ("--gpu-ranks", &self.gpu_ranks)
            } else {
                ("--ranks", &self.ranks)
            };
            for (i, &n) in counts.iter().enumerate() {
                if n == 0 {
                    return Err(Error::Argument(format!(
                        "{flag} 0: expected rank counts of at least 1"
                    )));
                }
                if counts[..i].contains(&n) {
                    return Err(Error::Argument(format!(
                        "{flag} lists {n} twice: each rank count is one run directory"
                    )));
                }
                let run_dir = self.out.join(format!("{backend}-n{n}"));
                if run_dir.exists() {
                    return Err(Error::Argument(format!(
                        "{} exists: bench scaling writes fresh run directories (remove it or pick another --out)",
                        run_dir.display()
                    )));
                }
                let argv = launch_argv(self, backend, n, &run_dir)?;
                plan.push(Launch {
                    backend,
                    ranks: n,
                    run_dir,
                    argv,
                });
            }
        }
        Ok(plan)
    }
}

/// Runs the series; each run's output goes to `<run dir>.log`. A failed or timed-out run is an
/// error that names its command and log (the rows finished before it are kept in the results).
pub fn run_scaling(
    o: &ScalingOptions,
    mut on_row: impl FnMut(&ScalingRow),
) -> Result<Vec<ScalingRow>> {
    // 1. Check every argument and plan every launch before anything is written.
    let timeout = o.timeout()?;
    let plan = o.plan()?;
    std::fs::create_dir_all(&o.out).map_err(|e| Error::io(&o.out, e))?;
    // 2. Launch them in turn, keeping the results written after each.
    let mut rows = Vec::new();
    for l in plan {
        let log = o.out.join(format!("{}-n{}.log", l.backend, l.ranks));
        let launch_s = match run_one(&l.argv, &log, timeout) {
            Ok(t) => t,
            Err(e) => {
                write_results(&o.out, &rows)?;
                return Err(e);
            }
        };
        let row = row_from_run(l.backend, l.ranks, &l.run_dir, l.argv.join(" "), launch_s)?;
        on_row(&row);
        rows.push(row);
        fill_speedups(&mut rows);
        write_results(&o.out, &rows)?;
    }
    Ok(rows)
}

fn write_results(out: &Path, rows: &[ScalingRow]) -> Result<()> {
    let text = serde_json::to_string_pretty(rows)
        .map_err(|e| Error::Invalid(format!("serialising the results: {e}")))?;
    crate::util::fs::write_atomic(&out.join(RESULTS), text.as_bytes())
}

/// `scaling.md`: a title, the rows as a table and, when a PyTorch peer ran, its step time
/// beside ctseg's 1-rank CPU step.
pub fn markdown(config: &Path, rows: &[ScalingRow], peer: Option<&PeerLine>) -> String {
    let mut md = format!(
        "# ctseg bench scaling: {}\n\nSpeedup is in throughput (images/s) against the backend's 1-rank run; epoch times hold different numbers of images at different rank counts (an epoch drops its last incomplete global batch).\n\n{}",
        config.display(),
        table(rows)
    );
    if let Some(p) = peer
        && let Some(r) = rows.iter().find(|r| r.backend == "cpu" && r.ranks == 1)
    {
        md.push_str(&format!(
            "\nPyTorch {} peer ({}, {} threads, width {}, size {}, batch {}): median step {:.3} s; ctseg 1-rank CPU median step {:.3} s = {:.2}× the peer's.\n",
            p.peer.torch,
            p.peer.device,
            p.threads,
            p.width,
            p.size,
            p.batch,
            p.peer.median_step_s,
            r.median_step_s,
            r.median_step_s / p.peer.median_step_s
        ));
    }
    md
}

/// A PyTorch peer's step beside the series, for [`markdown`].
pub struct PeerLine {
    /// What the peer printed.
    pub peer: super::PeerResult,
    /// Its threads.
    pub threads: usize,
    /// Model width.
    pub width: usize,
    /// Input size.
    pub size: usize,
    /// Batch.
    pub batch: usize,
}

/// A Markdown table of the rows.
pub fn table(rows: &[ScalingRow]) -> String {
    let mut t = String::from(
        "| backend | ranks | global batch | step (s) | epoch (s) | img/s | compute (s) | copy (s) | exposed comm (s) | data wait (s) | peak RSS (MB) | speedup (img/s) | efficiency |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        t.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.1} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.2} | {:.0} % |\n",
            r.backend,
            r.ranks,
            r.global_batch,
            r.median_step_s,
            r.epoch_time_s,
            r.images_per_s,
            r.compute_s,
            r.copy_s,
            r.comm_s,
            r.data_wait_s,
            r.peak_rss_mb,
            r.speedup,
            100.0 * r.efficiency
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(launcher: &str) -> ScalingOptions {
        ScalingOptions {
            exe: PathBuf::from("/bin/ctseg"),
            config: PathBuf::from("c.toml"),
            data: None,
            ranks: vec![1, 2],
            gpu_ranks: vec![1],
            backends: vec![crate::backend::BackendKind::Cpu],
            launcher: launcher.into(),
            out: PathBuf::from("/tmp/x"),
            train_args: vec!["--max-steps".into(), "3".into()],
            timeout_s: 10.0,
        }
    }

    #[test]
    fn launcher_template_and_errors() {
        let argv = launch_argv(
            &opts("mpirun -np {n} --bind-to none"),
            "cpu",
            4,
            Path::new("r"),
        )
        .expect("argv");
        assert_eq!(&argv[..5], ["mpirun", "-np", "4", "--bind-to", "none"]);
        assert_eq!(argv[5], "/bin/ctseg");
        assert_eq!(&argv[argv.len() - 2..], ["--max-steps", "3"]);
        // One rank without a launcher starts ctseg directly; more ranks need one.
        let argv = launch_argv(&opts(""), "cpu", 1, Path::new("r")).expect("argv");
        assert_eq!(argv[0], "/bin/ctseg");
        let e = launch_argv(&opts(""), "cpu", 2, Path::new("r")).err();
        assert!(e.is_some_and(|e| e.to_string().contains("launcher")));
        let e = launch_argv(&opts("mpirun -np 2"), "cpu", 2, Path::new("r")).err();
        assert!(e.is_some_and(|e| e.to_string().contains("{n}")));
    }

    #[test]
    fn a_series_is_planned_whole_before_its_first_launch() {
        let d = tempfile::tempdir().expect("tmp");
        let mut o = opts("mpirun -np {n}");
        o.out = d.path().to_path_buf();
        let plan = o.plan().expect("plan");
        let dirs: Vec<_> = plan.iter().map(|l| l.run_dir.clone()).collect();
        assert_eq!(dirs, [d.path().join("cpu-n1"), d.path().join("cpu-n2")]);
    }

    #[test]
    fn a_train_flag_the_series_sets_itself_is_refused() {
        for own in ["--quiet", "--out=x", "--config"] {
            let mut o = opts("mpirun -np {n}");
            o.train_args = vec![own.into()];
            let e = o.plan().err().expect("refused");
            assert!(
                e.to_string().contains(&format!("`{own}` after `--`")),
                "{e}"
            );
        }
    }

    #[test]
    fn a_backend_given_twice_is_refused() {
        // Its second series would have found the first one's run directories.
        let mut o = opts("mpirun -np {n}");
        o.backends = vec![
            crate::backend::BackendKind::Cpu,
            crate::backend::BackendKind::Cpu,
        ];
        let e = o.plan().err().expect("refused");
        assert!(e.to_string().contains("--backends lists cpu twice"), "{e}");
    }

    #[test]
    fn a_rank_count_of_zero_or_given_twice_is_refused_by_its_flag() {
        let refused = |ranks: Vec<usize>, gpu_ranks: Vec<usize>, needles: &[&str]| {
            let mut o = opts("mpirun -np {n}");
            o.ranks = ranks;
            o.gpu_ranks = gpu_ranks;
            o.backends = vec![
                crate::backend::BackendKind::Cpu,
                crate::backend::BackendKind::Gpu,
            ];
            let e = o.plan().err().expect("refused");
            assert!(matches!(e, Error::Argument(_)), "{e}");
            for n in needles {
                assert!(e.to_string().contains(n), "{e} lacks {n}");
            }
        };
        refused(vec![1, 0], vec![1], &["--ranks 0"]);
        refused(vec![1, 2, 2], vec![1], &["--ranks", "2 twice"]);
        refused(vec![1], vec![0], &["--gpu-ranks 0"]);
    }

    #[test]
    fn a_launcher_that_cannot_start_a_later_count_is_refused_before_the_first_run() {
        // The 1-rank run needs no launcher, the 2-rank one does: refused while planning.
        let e = opts("").plan().err().expect("refused");
        assert!(e.to_string().contains("2 ranks need a launcher"), "{e}");
    }

    #[test]
    fn speedup_is_throughput_against_the_one_rank_run_of_the_backend() {
        let row = |backend: &str, ranks, images_per_s| ScalingRow {
            backend: backend.into(),
            ranks,
            run_dir: PathBuf::new(),
            command: String::new(),
            device: String::new(),
            global_batch: 0,
            steps_per_epoch: 0,
            median_step_s: 0.0,
            epoch_time_s: 0.0,
            images_per_s,
            compute_s: 0.0,
            copy_s: 0.0,
            comm_s: 0.0,
            data_wait_s: 0.0,
            peak_rss_mb: 0.0,
            speedup: f64::NAN,
            efficiency: f64::NAN,
            final_loss: 0.0,
            dice_liver: 0.0,
            launch_s: 0.0,
        };
        let mut rows = vec![
            row("cpu", 1, 6.0),
            row("cpu", 2, 10.0),
            row("cpu", 4, 15.0),
            row("gpu", 1, 60.0),
        ];
        fill_speedups(&mut rows);
        // 10/6 = 1.667 (efficiency 0.833), 15/6 = 2.5 (0.625); the GPU is its own base.
        assert!((rows[1].speedup - 10.0 / 6.0).abs() < 1e-12);
        assert!((rows[2].efficiency - 0.625).abs() < 1e-12);
        assert_eq!(rows[3].speedup, 1.0);
    }
}
