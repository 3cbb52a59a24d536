//! Data-parallel training under a real `mpirun` (OpenMPI), each launch under a timeout so that a
//! hang fails the test instead of CI: equivalence with a single process, identical weights on
//! all ranks, distributed validation, faults and resume.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

fn single(args: &[&str]) -> Output {
    ctseg(args)
}

fn config(dir: &Path, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    write_config(dir, name, edit)
}

/// No BatchNorm, no dropout, no LR scaling: N ranks × batch b is the same arithmetic as one
/// process × batch N·b (DistributedSampler order makes the global batches the same slices).
fn exact_config(dir: &Path, per_rank_batch: usize) -> PathBuf {
    config(dir, &format!("exact{per_rank_batch}.toml"), |t| {
        t.replace("norm = \"batch\"", "norm = \"none\"")
            .replace("dropout = 0.5", "dropout = 0.0")
            .replace("lr_scaling = \"linear\"", "lr_scaling = \"none\"")
            .replace("batch_size = 4", &format!("batch_size = {per_rank_batch}"))
    })
}

fn assert_same_trajectory(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) / x).abs())
        .fold(0.0f64, f64::max);
    eprintln!(
        "{what}: largest relative loss difference over {} steps: {worst:.2e}",
        a.len()
    );
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        // Tolerance: the same images in a different f32 summation order (per-rank means then a
        // mean of means), carried through Adam for 15 steps: measured 2.1e-7 (2 ranks) and
        // 1.1e-7 (4 ranks) relative; 1e-5 leaves room for other CPUs' rounding.
        assert!(
            ((x - y) / x).abs() < 1e-5,
            "{what}: step {}: {x} vs {y}",
            i + 1
        );
    }
}

#[test]
fn two_and_four_ranks_follow_the_single_process_trajectory() {
    let d = tempfile::tempdir().expect("tmp");
    let one = d.path().join("one");
    ok(single(&[
        "train",
        "--config",
        s(&exact_config(d.path(), 4)),
        "--out",
        s(&one),
        "--quiet",
    ]));
    let two = d.path().join("two");
    ok(mpirun(
        2,
        &[
            "train",
            "--config",
            s(&exact_config(d.path(), 2)),
            "--out",
            s(&two),
            "--quiet",
        ],
        &[],
        120,
    ));
    let four = d.path().join("four");
    ok(mpirun(
        4,
        &[
            "train",
            "--config",
            s(&exact_config(d.path(), 1)),
            "--out",
            s(&four),
            "--quiet",
        ],
        &[],
        180,
    ));
    let l1 = losses(&one);
    assert_eq!(l1.len(), 15);
    assert_same_trajectory(&l1, &losses(&two), "2 ranks × batch 2 vs 1 × 4");
    assert_same_trajectory(&l1, &losses(&four), "4 ranks × batch 1 vs 1 × 4");
}

fn hashes(t: &str) -> Vec<String> {
    t.lines()
        .filter_map(|l| l.split("final weights hash ").nth(1))
        .map(|h| h.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn batchnorm_ranks_end_bit_identical_and_validation_is_global() {
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("bn");
    let t = ok(mpirun(
        2,
        &[
            "train",
            "--config",
            TINY,
            "--out",
            s(&run),
            "--max-steps",
            "7",
            "--quiet",
        ],
        &[],
        120,
    ));
    let h = hashes(&t);
    assert_eq!(h.len(), 2, "{t}");
    assert_eq!(h[0], h[1], "ranks hold different weights:\n{t}");
    assert!(t.contains("identical on all ranks"), "{t}");

    // The checkpoint evaluated by 1, 2 and 3 ranks gives the same global figures: hard Dice
    // from summed integer counts is exact; the loss sums f32 Dice values in f64.
    let one = ok(single(&["validate", "--checkpoint", s(&run), "--json"]));
    let two = ok(mpirun(
        2,
        &["validate", "--checkpoint", s(&run), "--json"],
        &[],
        120,
    ));
    let three = ok(mpirun(
        3,
        &["validate", "--checkpoint", s(&run), "--json"],
        &[],
        120,
    ));
    let parse = |t: &str| -> serde_json::Value {
        let line = t.lines().find(|l| l.starts_with('{')).expect("json line");
        serde_json::from_str(line).expect("json")
    };
    let (v1, v2, v3) = (parse(&one), parse(&two), parse(&three));
    assert_eq!(
        v1["counts"], v2["counts"],
        "tp/fp/fn differ between 1 and 2 ranks"
    );
    assert_eq!(
        v1["counts"], v3["counts"],
        "tp/fp/fn differ between 1 and 3 ranks"
    );
    assert_eq!(v1["images"], v3["images"]);
    let (l1, l3) = (
        v1["loss"].as_f64().unwrap_or(0.0),
        v3["loss"].as_f64().unwrap_or(1.0),
    );
    assert!((l1 - l3).abs() < 1e-6, "val loss {l1} vs {l3}");
}

#[test]
fn a_panicking_rank_ends_the_job_and_resume_recovers_the_run() {
    let d = tempfile::tempdir().expect("tmp");
    // Uninterrupted reference: 2 ranks × batch 4 over 20 slices: 2 steps per epoch, 6 steps.
    let full = d.path().join("full");
    let t = ok(mpirun(
        2,
        &["train", "--config", TINY, "--out", s(&full), "--quiet"],
        &[],
        120,
    ));
    let reference = hashes(&t);

    // Rank 1 panics after step 3 (epoch 2; the epoch-1 checkpoint is at step 2).
    let run = d.path().join("crash");
    let start = Instant::now();
    // The whole run (3 steps, then the panic) gets 60 s: a job that outlives its failed rank
    // is killed by the timeout (status 124) and fails the test as a hang.
    let o = mpirun(
        2,
        &["train", "--config", TINY, "--out", s(&run), "--quiet"],
        &[("CTSEG_FAULT_INJECT", "step:1:3")],
        60,
    );
    let took = start.elapsed();
    let t = text(&o);
    assert!(!o.status.success(), "mpirun must fail:\n{t}");
    assert_ne!(
        o.status.code(),
        Some(124),
        "the job hung after the panic until the 60 s timeout:\n{t}"
    );
    assert!(t.contains("CTSEG_FAULT_INJECT"), "{t}");
    let ck =
        ctseg::rundir::Checkpoint::load(&run.join("checkpoint.ctck")).expect("last checkpoint");
    assert_eq!(ck.meta.step, 2);
    eprintln!(
        "mpirun exited {took:?} after the injected panic (status {})",
        o.status
    );

    // Resume with the same 2 ranks: same final weights as the uninterrupted run.
    let t = ok(mpirun(
        2,
        &["train", "--resume", s(&run), "--quiet"],
        &[],
        120,
    ));
    assert_eq!(
        hashes(&t),
        reference,
        "resumed run ends with other weights:\n{t}"
    );
    assert_eq!(losses(&run), losses(&full), "resumed loss curve differs");
}

#[test]
fn a_killed_rank_ends_the_job_promptly() {
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("kill");
    let cfg = config(d.path(), "long.toml", |t| {
        t.replace("epochs = 3", "epochs = 200")
    });
    let session = MpiSession::new();
    let mut c = mpirun_command(&session, Some(120));
    c.args(["-np", "2"])
        .arg(env!("CARGO_BIN_EXE_ctseg"))
        .args(["train", "--config", s(&cfg), "--out", s(&run), "--quiet"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().expect("spawn mpirun");
    // Wait until training runs, then kill one rank (a ctseg process whose parent is not us).
    let metrics = run.join("metrics.jsonl");
    let t0 = Instant::now();
    while !metrics.exists() || std::fs::metadata(&metrics).map_or(0, |m| m.len()) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // timeout → mpirun → ranks.
    let children = |pid: &str| -> Vec<String> {
        let out = Command::new("pgrep")
            .args(["-P", pid])
            .output()
            .expect("pgrep");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let mpirun_pid = children(&child.id().to_string())
        .pop()
        .expect("mpirun process");
    let pids = children(&mpirun_pid);
    assert!(!pids.is_empty(), "no rank found");
    let killed = Instant::now();
    let _ = Command::new("kill")
        .args(["-9", pids.last().map(String::as_str).unwrap_or("")])
        .status();
    // A hang guard, not a speed test: mpirun gets 30 s to notice the dead rank, after which
    // the job is killed and the test fails as a hang.
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if killed.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mpirun still running 30 s after a rank was killed: the job hangs");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "mpirun must report the failure");
    assert_ne!(status.code(), Some(124), "hung until the timeout");
    eprintln!(
        "mpirun exited {:?} after a rank was killed (status {status})",
        killed.elapsed()
    );
}

#[test]
fn resuming_with_another_rank_count_rescales_and_says_so() {
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("two");
    ok(mpirun(
        2,
        &[
            "train",
            "--config",
            TINY,
            "--out",
            s(&run),
            "--max-steps",
            "4",
            "--quiet",
        ],
        &[],
        120,
    ));
    // 4 steps × global batch 8 = 32 images; one process (batch 4, 5 steps/epoch) resumes at
    // image 32 = step 8 = epoch 2, batch 3, with the learning rate scaled for 1 rank.
    let t = ok(single(&["train", "--resume", s(&run), "--max-steps", "10"]));
    assert!(
        t.contains("written by 2 rank(s) (global batch 8) on 1 (global batch 4)"),
        "{t}"
    );
    assert!(
        t.contains("sampler restarted at epoch 2, batch 3 (32 images seen)"),
        "{t}"
    );
    assert!(t.contains("learning rate rescaled to 0.0010"), "{t}");
}

#[test]
fn training_across_two_emulated_hosts() {
    // Two network namespaces on a bridge, links shaped to 1 Gbit/s, one mpirun across them
    // (scripts/emulate_hosts.sh). Needs root for `ip netns`; CI runs as root.
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !is_root {
        // In CI (and wherever references are required) a skip would pass untested.
        assert!(
            !references_required(),
            "network namespaces need root: run the suite as root, as .ci/run does"
        );
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let d = tempfile::tempdir().expect("tmp");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/emulate_hosts.sh");
    let session = MpiSession::new();
    let launch = |run: &Path| {
        session
            .apply(&mut Command::new("timeout"))
            .args([
                "180",
                script,
                "-k",
                "2",
                "-r",
                "1gbit",
                "--",
                env!("CARGO_BIN_EXE_ctseg"),
            ])
            .args(["train", "--config", TINY, "--out", s(run), "--quiet"])
            .output()
            .expect("run emulate_hosts.sh")
    };
    let mut o = launch(&d.path().join("hosts"));
    // OpenMPI sometimes fails to start its daemon in the second namespace while other tests
    // load the machine (orted's session-directory/TCP start-up, before any ctseg rank runs:
    // seen 3 times in 12 runs of this file). Only that failure is retried, once, and said.
    if !o.status.success() && text(&o).contains("ORTE was unable to reliably start") {
        eprintln!(
            "OpenMPI daemon start-up failed; retrying once:\n{}",
            text(&o)
        );
        o = launch(&d.path().join("hosts-retry"));
    }
    let t = ok(o);
    assert!(t.contains("emulate_hosts: 2 host(s)"), "{t}");
    let h = hashes(&t);
    assert_eq!(h.len(), 2, "{t}");
    assert_eq!(h[0], h[1]);
    // Same job on one host gives the same model: the network changes nothing but time.
    let local = d.path().join("local");
    let t2 = ok(mpirun(
        2,
        &["train", "--config", TINY, "--out", s(&local), "--quiet"],
        &[],
        120,
    ));
    assert_eq!(
        hashes(&t2)[0],
        h[0],
        "emulated hosts and one host trained different models"
    );
    // Nothing is left behind.
    let ns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns");
    assert!(
        !String::from_utf8_lossy(&ns.stdout).contains("ctseg"),
        "namespaces left behind"
    );
}

#[test]
fn gpu_backend_under_mpirun() {
    if ctseg::backend::list_adapters().is_empty() {
        assert!(!gpu_required(), "no adapter");
        eprintln!("skipped: no GPU adapter");
        return;
    }
    let d = tempfile::tempdir().expect("tmp");
    let gpu_run = |run: &Path, compression: &str| {
        let t = ok(mpirun(
            2,
            &[
                "train",
                "--config",
                TINY,
                "--backend",
                "gpu",
                "--out",
                s(run),
                "--max-steps",
                "4",
                "--grad-compression",
                compression,
                "--quiet",
            ],
            &[],
            300,
        ));
        let h = hashes(&t);
        assert_eq!(h.len(), 2, "{t}");
        assert_eq!(
            h[0], h[1],
            "GPU ranks ({compression}) hold different weights:\n{t}"
        );
    };
    let run = d.path().join("gpu");
    gpu_run(&run, "none");
    let fp32 = losses(&run);
    assert_eq!(fp32.len(), 4);

    // fp16 compression on the GPU packs and unpacks with the WGSL kernels (shaders/): the ranks
    // still agree bit for bit, and the trajectory stays within the fp16 bound of the CPU test.
    let run16 = d.path().join("gpu16");
    gpu_run(&run16, "fp16");
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run16.join("summary.json")).expect("summary"),
    )
    .expect("json");
    assert!(
        summary["grad_exchange"]
            .as_str()
            .is_some_and(|e| e.contains("on the device (WGSL)")),
        "{summary}"
    );
    // `--gpu-conv auto` ran its collectives on both ranks before the first step (a rank
    // left out would have hung the job) and decided on their mean.
    assert_eq!(summary["gpu_conv"]["ranks"], 2, "{summary}");
    let fp16 = losses(&run16);
    let worst = fp32
        .iter()
        .zip(&fp16)
        .map(|(x, y)| ((x - y) / x).abs())
        .fold(0.0f64, f64::max);
    eprintln!("GPU fp16 vs fp32 gradients: largest relative loss difference {worst:.2e}");
    assert!(
        worst < 1e-3,
        "GPU fp16 trajectory drifted: {fp32:?} vs {fp16:?}"
    );
}

#[test]
fn a_rank_that_cannot_build_ctsegs_kernels_keeps_every_rank_on_burns() {
    if ctseg::backend::list_adapters().is_empty() {
        assert!(!gpu_required(), "no adapter");
        eprintln!("skipped: no GPU adapter");
        return;
    }
    // Rank 1's driver rejects ctseg's convolution kernels (CTSEG_FAULT_INJECT), rank 0's
    // runs them: `--gpu-conv auto` must agree on burn's kernels on both (ranks running
    // different kernels would train different models), rank 0 saying the failure was another
    // rank's. `retime`: a kept timing would spare the kernels the trial.
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    let args = [
        "train",
        "--config",
        TINY,
        "--backend",
        "gpu",
        "--gpu-conv",
        "retime",
        "--out",
        s(&run),
        "--max-steps",
        "2",
        "--quiet",
    ];
    ok(mpirun(
        2,
        &args,
        &[("CTSEG_FAULT_INJECT", "wgsl-conv:1:0")],
        300,
    ));
    let sm = summary(&run);
    let c = sm.gpu_conv.expect("timed");
    assert_eq!(
        (c.chosen, c.ranks),
        (ctseg::model::GpuConv::Burn, 2),
        "{}",
        sm.device
    );
    let why = c.fallback.expect("a reason");
    assert!(why.contains("on another rank"), "{why}");
    assert_eq!(losses(&run).len(), 2);
}

#[test]
fn fp16_compression_and_bucketing_keep_the_trajectory() {
    let d = tempfile::tempdir().expect("tmp");
    // Small buckets (0.01 MB: the tiny model's 7,653 gradients make 4 of them), overlap on.
    let bucketed = config(d.path(), "b.toml", |t| {
        t.replace("bucket_mb = 128.0", "bucket_mb = 0.01")
            .replace("overlap = false", "overlap = true")
    });
    let one_bucket = d.path().join("one");
    let many = d.path().join("many");
    let fp16 = d.path().join("fp16");
    ok(mpirun(
        2,
        &[
            "train",
            "--config",
            TINY,
            "--out",
            s(&one_bucket),
            "--quiet",
        ],
        &[],
        120,
    ));
    let t = ok(mpirun(
        2,
        &[
            "train",
            "--config",
            s(&bucketed),
            "--out",
            s(&many),
            "--quiet",
        ],
        &[],
        120,
    ));
    let h = hashes(&t);
    assert_eq!(h[0], h[1], "{t}");
    let t = ok(mpirun(
        2,
        &[
            "train",
            "--config",
            s(&bucketed),
            "--out",
            s(&fp16),
            "--grad-compression",
            "fp16",
            "--quiet",
        ],
        &[],
        120,
    ));
    let h = hashes(&t);
    assert_eq!(h[0], h[1], "fp16 ranks differ:\n{t}");
    let (a, b, c) = (losses(&one_bucket), losses(&many), losses(&fp16));
    // Buckets change only which MPI calls carry the values: same sums up to summation order.
    assert_same_trajectory(&a, &b, "4 buckets vs 1");
    // fp16 rounds every gradient to 11 significant bits; over 6 Adam steps the loss moves by
    // less than 1e-3 relative (measured 2.0e-4).
    let worst = a
        .iter()
        .zip(&c)
        .map(|(x, y)| ((x - y) / x).abs())
        .fold(0.0f64, f64::max);
    eprintln!("fp16 vs fp32 gradients: largest relative loss difference {worst:.2e}");
    assert!(worst < 1e-3, "fp16 trajectory drifted: {a:?} vs {c:?}");
    // The exchange is logged per step.
    let m = metrics(&many);
    let step = m.steps.first().expect("a step");
    assert!(step.copy_s.is_some_and(|c| c >= 0.0) && step.comm_total_s.is_some_and(|c| c > 0.0));
}

#[test]
fn accumulating_micro_batches_equals_more_ranks() {
    // `--accumulate 2` on one process runs the micro-batches of virtual ranks 0 and 1: the same
    // images, dropout masks (stream = virtual rank) and linear LR scaling as 2 ranks. Without
    // BatchNorm the arithmetic is the same too: rank sums g0 + g1 (commutative, so the same
    // bits as MPI's 2-rank sum) then × 1/2, so the runs must end bit-identical.
    let d = tempfile::tempdir().expect("tmp");
    let cfg = config(d.path(), "acc.toml", |t| {
        t.replace("norm = \"batch\"", "norm = \"none\"")
            .replace("batch_size = 4", "batch_size = 2")
    });
    let two = d.path().join("two");
    ok(mpirun(
        2,
        &["train", "--config", s(&cfg), "--out", s(&two), "--quiet"],
        &[],
        120,
    ));
    let acc = d.path().join("acc");
    ok(single(&[
        "train",
        "--config",
        s(&cfg),
        "--out",
        s(&acc),
        "--quiet",
        "--threads",
        "1",
        "--accumulate",
        "2",
    ]));
    let summary = |run: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).expect("summary"))
            .expect("summary json")
    };
    let (a, b) = (summary(&two), summary(&acc));
    assert_eq!(a["global_batch"], 4);
    assert_eq!(b["global_batch"], 4);
    assert_eq!(b["accumulate"], 2);
    assert_eq!(a["steps"], b["steps"]);
    let (la, lb) = (losses(&two), losses(&acc));
    assert!(la.len() >= 5, "{la:?}");
    assert_eq!(la, lb, "loss trajectories");
    assert_eq!(a["weights_hash"], b["weights_hash"], "final weights");
}

#[test]
fn scaling_series_model_and_report_from_the_command_line() {
    // The documented sequence on the tiny config: a 1- and 2-rank CPU series through mpirun
    // (each launch under `timeout`), the performance model checked against the 2-rank run, and
    // the report of both runs.
    let d = tempfile::tempdir().expect("tmp");
    let out = d.path().join("series");
    let launcher =
        "timeout 120 mpirun -np {n} --oversubscribe --bind-to none --mca btl self,vader,tcp";
    let session = MpiSession::new();
    let t = ok(session
        .apply(&mut Command::new(env!("CARGO_BIN_EXE_ctseg")))
        .args([
            "bench",
            "scaling",
            "--config",
            TINY,
            "--ranks",
            "1,2",
            "--launcher",
            launcher,
            "--out",
            s(&out),
            "--",
            "--max-steps",
            "6",
        ])
        .output()
        .expect("run ctseg bench scaling"));
    assert!(t.contains("| cpu | 2 |"), "{t}");
    let rows: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("scaling.json")).expect("scaling.json"),
    )
    .expect("json");
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), 2);
    for (r, n) in rows.iter().zip([1u64, 2]) {
        assert_eq!(r["ranks"], n);
        // Global batch = 4 per rank; the epoch time is steps per epoch × the median step.
        assert_eq!(r["global_batch"], 4 * n);
        let (spe, step, epoch) = (
            r["steps_per_epoch"].as_f64().unwrap_or(0.0),
            r["median_step_s"].as_f64().unwrap_or(0.0),
            r["epoch_time_s"].as_f64().unwrap_or(0.0),
        );
        assert!(spe >= 1.0 && step > 0.0, "{r}");
        assert!((epoch - spe * step).abs() < 1e-9 * epoch.max(1.0), "{r}");
        assert!(r["peak_rss_mb"].as_f64().unwrap_or(0.0) > 1.0, "{r}");
    }
    assert_eq!(rows[0]["speedup"], 1.0);

    let model = d.path().join("model");
    let t = ok(single(&[
        "bench",
        "model",
        "--run",
        s(&out.join("cpu-n1")),
        "--link-gbps",
        "10",
        "--max-ranks",
        "8",
        "--steps-to-target",
        "4=30,16=12",
        "--validate",
        s(&out.join("cpu-n2")),
        "--out",
        s(&model),
    ]));
    assert!(t.contains("Predicted against measured"), "{t}");
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("model.json")).expect("model.json"),
    )
    .expect("json");
    assert_eq!(m["predictions"].as_array().map(Vec::len), Some(4)); // 1, 2, 4, 8 ranks
    // Steps to target are given at global batch 4 and 16: 30 at 1 rank (batch 4), log-log
    // interpolated 30·(12/30)^(1/2) = 18.97 at 2 ranks (batch 8), none beyond 16.
    assert_eq!(m["predictions"][0]["steps_to_target"], 30.0);
    let s2 = m["predictions"][1]["steps_to_target"]
        .as_f64()
        .unwrap_or(0.0);
    assert!((s2 - 30.0 * (12.0f64 / 30.0).sqrt()).abs() < 1e-9, "{s2}");
    assert!(m["predictions"][3]["steps_to_target"].is_null());
    assert_eq!(m["validation"][0]["ranks"], 2);

    let report = d.path().join("report");
    let t = ok(single(&["report", s(&out), "--out", s(&report)]));
    assert!(t.contains("report of 2 run(s)"), "{t}");
    for f in [
        "index.html",
        "speedup.png",
        "loss.svg",
        "dice.png",
        "time_to_target.md",
        "runs.csv",
    ] {
        assert!(report.join(f).is_file(), "{f} missing");
    }

    // Bad input: a folder without runs is named, exit status 2, nothing written.
    let empty = d.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let o = single(&["report", s(&empty), "--out", s(&d.path().join("r2"))]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains(s(&empty)), "{}", text(&o));
    assert!(!d.path().join("r2").exists());
}

/// A job whose rank fails must end promptly and non-zero, naming the cause (a hang is killed
/// by the timeout, status 124, and fails the test).
fn ends_promptly(o: &Output, needle: &str) -> String {
    let t = text(o);
    assert!(!o.status.success(), "mpirun must fail:\n{t}");
    assert_ne!(o.status.code(), Some(124), "the job hung:\n{t}");
    assert!(
        t.contains(needle),
        "the cause {needle:?} is not named:\n{t}"
    );
    t
}

#[test]
fn a_rank_that_fails_in_bench_step_ends_the_job() {
    let o = mpirun(
        2,
        &[
            "bench", "step", "--config", TINY, "--warmup", "1", "--steps", "20",
        ],
        &[("CTSEG_FAULT_INJECT", "bench:1:2")],
        120,
    );
    ends_promptly(&o, "CTSEG_FAULT_INJECT");
}

#[test]
fn a_rank_whose_loader_fails_ends_the_job() {
    let d = tempfile::tempdir().expect("tmp");
    let o = mpirun(
        2,
        &[
            "train",
            "--config",
            TINY,
            "--out",
            s(&d.path().join("r")),
            "--quiet",
        ],
        &[("CTSEG_FAULT_INJECT", "loader:1:2")],
        120,
    );
    // The loader thread's panic reaches the panic hook, which aborts the job (without MPI the
    // trainer reports "the data loader delivered 1 of N batches": src/data/loader.rs).
    ends_promptly(&o, "fails at loader 2");
}

#[test]
fn ranks_given_different_datasets_stop_before_training() {
    // A stale node-local copy of --data: rank 1 opens another dataset than rank 0 (mpirun's
    // MPMD form gives each rank its own arguments). Both must stop, naming the rank that differs,
    // before any step (they would meet in mismatched collectives).
    let d = tempfile::tempdir().expect("tmp");
    let data = |name: &str, seed: &str| {
        let p = d.path().join(name);
        ok(ctseg(&[
            "phantom",
            "--count",
            "24",
            "--size",
            "32",
            "--slices-per-volume",
            "4",
            "--seed",
            seed,
            "--out",
            s(&p),
        ]));
        p
    };
    let (a, b) = (data("a", "1"), data("b", "2"));
    let run = d.path().join("run");
    let rank = |data: &Path| -> Vec<String> {
        [
            "-np",
            "1",
            &bin(),
            "train",
            "--config",
            TINY,
            "--quiet",
            "--out",
            s(&run),
            "--data",
            s(data),
        ]
        .map(String::from)
        .to_vec()
    };
    let session = MpiSession::new();
    let o = mpirun_command(&session, Some(120))
        .args(rank(&a))
        .arg(":")
        .args(rank(&b))
        .output()
        .expect("mpirun");
    let t = ends_promptly(&o, "rank 1 differs from rank 0");
    assert!(t.contains(s(&a)) && t.contains(s(&b)), "{t}");
    assert_eq!(steps_logged(&run), 0, "no step may run");
}

#[test]
fn usr1_to_mpirun_stops_every_rank_at_one_step_and_resume_continues_it() {
    // mpirun relays SIGUSR1 to every rank (as srun does for Slurm's --signal warning); the
    // ranks agree on the stop at a step boundary, rank 0 checkpoints there, the job exits 4,
    // and a resume ends with the uninterrupted run's weights.
    let d = tempfile::tempdir().expect("tmp");
    let cfg = config(d.path(), "long.toml", |t| {
        t.replace("epochs = 3", "epochs = 60")
    });
    let (full, part) = (d.path().join("full"), d.path().join("part"));
    let reference = hashes(&ok(mpirun(
        2,
        &["train", "--config", s(&cfg), "--out", s(&full), "--quiet"],
        &[],
        600,
    )));
    // Started directly (not under `timeout`, which would have to pass the signal on).
    let session = MpiSession::new();
    let mut job = mpirun_command(&session, None)
        .args(["-np", "2"])
        .arg(bin())
        .args(["train", "--config", s(&cfg), "--out", s(&part), "--quiet"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mpirun");
    let t0 = Instant::now();
    while steps_logged(&part) < 5 {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "the job did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = Command::new("kill")
        .args(["-USR1", &job.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let t1 = Instant::now();
    while job.try_wait().expect("wait").is_none() {
        if t1.elapsed() > Duration::from_secs(120) {
            let _ = job.kill();
            panic!("the job did not stop within 120 s of SIGUSR1");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = job.wait_with_output().expect("wait");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(4), "{t}");
    let ck = ctseg::rundir::Checkpoint::load(&part.join("checkpoint.ctck")).expect("checkpoint");
    assert_eq!(ck.meta.step as usize, losses(&part).len(), "{t}");
    let resumed = ok(mpirun(
        2,
        &["train", "--resume", s(&part), "--quiet"],
        &[],
        600,
    ));
    assert_eq!(hashes(&resumed), reference, "{resumed}");
    assert_eq!(losses(&part), losses(&full));
}

#[test]
fn validate_under_mpirun_gives_each_rank_its_share_of_the_node() {
    // Two ranks on one node split its cores (as `train` does), each validates half the slices,
    // and rank 0 reports the global figures on its own device.
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    ok(single(&[
        "train",
        "--config",
        TINY,
        "--out",
        s(&run),
        "--max-steps",
        "3",
        "--quiet",
    ]));
    let t = ok(mpirun(2, &["validate", "--checkpoint", s(&run)], &[], 120));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / 2).max(1);
    let plural = if threads == 1 { "" } else { "s" };
    assert!(
        t.contains(&format!("burn flex, {threads} thread{plural})")) && t.contains("of 2"),
        "{t}"
    );
}

#[test]
fn step_profile_under_mpirun_is_collective_and_reported_once() {
    // Every rank runs the profiled steps (their gradient exchanges must pair up, or the job
    // hangs); rank 0 alone prints the profile.
    let o = mpirun(
        2,
        &[
            "bench",
            "step",
            "--config",
            TINY,
            "--warmup",
            "0",
            "--steps",
            "1",
            "--profile",
            "2",
            "--json",
        ],
        &[],
        120,
    );
    let out = ok(o);
    let profiles = bench_lines(&out, "profile");
    assert_eq!(profiles.len(), 1, "{out}");
    assert_eq!(profiles[0]["steps"], 2);
}

#[test]
fn an_overflow_on_one_rank_skips_the_step_on_every_rank() {
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("mixed");
    // Mixed precision on 2 ranks (the CPU computes mixed precision's numerics too); rank 1's
    // gradients of step 2 are made to count as overflowed (test-hooks fault). GradScaler's
    // found_inf is shared by all ranks: both must skip step 2 and halve the scale, or their
    // weights would part.
    let t = ok(mpirun(
        2,
        &[
            "train",
            "--config",
            TINY,
            "--precision",
            "mixed",
            "--out",
            s(&run),
            "--max-steps",
            "4",
        ],
        &[("CTSEG_FAULT_INJECT", "overflow:1:2")],
        120,
    ));
    assert!(
        t.contains("step 2: gradients not finite at loss scale 65536"),
        "{t}"
    );
    let h = hashes(&t);
    assert_eq!(h.len(), 2, "{t}");
    assert_eq!(h[0], h[1], "ranks hold different weights:\n{t}");
    let sm = summary(&run);
    assert_eq!((sm.skipped_steps, sm.loss_scale), (1, Some(32_768.0)));
    let skipped: Vec<u64> = metrics(&run)
        .steps
        .iter()
        .filter(|r| r.skipped)
        .map(|r| r.step)
        .collect();
    assert_eq!(skipped, vec![2]);
}
