//! The `ctseg` binary end to end: configs, datasets, training runs, resume, divergence, errors.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The raw JSON records of `kind` in a run's `metrics.jsonl` (the file format, as the README
/// documents it).
fn raw_records(run: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
        .filter(|v| v["kind"] == kind)
        .collect()
}

#[test]
fn model_prints_livermask_counts() {
    let t = ok(ctseg(&["model", "--config", LIVERMASK]));
    // 31,391,493: livermask's Keras model.summary() and the PyTorch peer's parameter count.
    assert!(t.contains("trainable parameters: 31391493"), "{t}");
    assert!(
        t.contains("non-trainable buffers (BN running statistics): 13570"),
        "{t}"
    );
    // Forward: 2·MACs of the convolutions (≈ 48.9 GMAC, from the layer shapes) plus the cheap
    // layers.
    assert!(t.contains("forward GFLOP per image: 98.0"), "{t}");
    assert!(t.contains("decoder.3.1.conv"), "{t}");
}

#[test]
fn bad_configs_are_named_errors() {
    let d = tempfile::tempdir().expect("tmp");
    let unknown = write_config(d.path(), "unknown.toml", |s| {
        s.replace("[train]", "[train]\nbatch_sise = 3")
    });
    fails_with(
        ctseg(&["model", "--config", unknown.to_str().unwrap_or("")]),
        2,
        &["unknown.toml", "batch_sise"],
    );
    let zero = write_config(d.path(), "zero.toml", |s| {
        s.replace("batch_size = 4", "batch_size = 0")
    });
    fails_with(
        ctseg(&[
            "train",
            "--config",
            zero.to_str().unwrap_or(""),
            "--out",
            d.path().join("r").to_str().unwrap_or(""),
        ]),
        2,
        &["zero.toml", "train.batch_size"],
    );
    fails_with(
        ctseg(&["model", "--config", TINY, "--size", "30"]),
        2,
        &["model.input_size", "multiple of 2^depth = 4"],
    );
    let opt = write_config(d.path(), "opt.toml", |s| {
        s.replace("name = \"adam\"", "name = \"rmsprop\"")
    });
    fails_with(
        ctseg(&["model", "--config", opt.to_str().unwrap_or("")]),
        2,
        &["opt.toml", "rmsprop", "adadelta"],
    );
    fails_with(
        ctseg(&["model", "--config", "/nonexistent/c.toml"]),
        2,
        &["/nonexistent/c.toml"],
    );
    assert!(
        !d.path().join("r").exists(),
        "nothing written for a bad config"
    );
}

/// A phantom dataset in `dir/data`: 24 slices of 32² from 6 volumes, in 3 shards (`extra`:
/// more `phantom` arguments); and what the command printed.
fn phantom_dataset_with(dir: &Path, extra: &[&str]) -> (PathBuf, String) {
    let data = dir.join("data");
    let mut args = vec![
        "phantom",
        "--count",
        "24",
        "--size",
        "32",
        "--slices-per-volume",
        "4",
        "--out",
        s(&data),
        "--shard-slices",
        "10",
    ];
    args.extend_from_slice(extra);
    let printed = ok(ctseg(&args));
    (data, printed)
}

fn phantom_dataset(dir: &Path) -> PathBuf {
    phantom_dataset_with(dir, &[]).0
}

#[test]
fn phantom_writes_a_dataset_in_shards_and_a_preview() {
    let d = tempfile::tempdir().expect("tmp");
    let png = d.path().join("grid.png");
    let (data, t) = phantom_dataset_with(d.path(), &["--preview", s(&png)]);
    assert!(
        t.contains("wrote 24 slices of 32x32 from 6 phantom volumes in 3 shard(s)"),
        "{t}"
    );
    assert!(png.exists());
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data.join("dataset.json")).expect("manifest"),
    )
    .expect("json");
    assert_eq!(m["volumes"].as_array().map(Vec::len), Some(6));
}

#[test]
fn training_on_a_phantom_dataset_writes_a_run_directory() {
    let d = tempfile::tempdir().expect("tmp");
    let data = phantom_dataset(d.path());
    let run = d.path().join("run");
    ok(ctseg(&[
        "train",
        "--config",
        TINY,
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--epochs",
        "1",
        "--quiet",
    ]));
    for f in [
        "config.resolved.toml",
        "metrics.jsonl",
        "checkpoint.ctck",
        "summary.json",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
}

#[test]
fn a_dataset_of_another_size_than_the_model_is_refused() {
    let d = tempfile::tempdir().expect("tmp");
    let data = phantom_dataset(d.path());
    fails_with(
        ctseg(&[
            "train",
            "--config",
            TINY,
            "--size",
            "64",
            "--data",
            s(&data),
        ]),
        2,
        &["32x32", "model.input_size is 64"],
    );
}

#[test]
fn phantom_refuses_to_write_over_a_dataset() {
    let d = tempfile::tempdir().expect("tmp");
    let data = phantom_dataset(d.path());
    let manifest = std::fs::read(data.join("dataset.json")).expect("manifest");
    fails_with(
        ctseg(&["phantom", "--count", "4", "--size", "32", "--out", s(&data)]),
        2,
        &["already exists"],
    );
    assert_eq!(
        std::fs::read(data.join("dataset.json")).expect("manifest"),
        manifest
    );
}

#[test]
fn a_flipped_byte_in_a_shard_is_caught_by_its_checksum() {
    let d = tempfile::tempdir().expect("tmp");
    let data = phantom_dataset(d.path());
    let shard = data.join("shard-00001.ctshard");
    let mut bytes = std::fs::read(&shard).expect("shard");
    bytes[100] ^= 0x40;
    std::fs::write(&shard, bytes).expect("write");
    let run = d.path().join("run");
    fails_with(
        ctseg(&[
            "train",
            "--config",
            TINY,
            "--data",
            s(&data),
            "--out",
            s(&run),
        ]),
        2,
        &["shard-00001.ctshard", "checksum mismatch"],
    );
    assert!(!run.exists(), "a refused run left {}", run.display());
}

#[test]
fn a_truncated_shard_is_refused_by_its_header() {
    let d = tempfile::tempdir().expect("tmp");
    let data = phantom_dataset(d.path());
    let shard = data.join("shard-00001.ctshard");
    let bytes = std::fs::read(&shard).expect("shard");
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).expect("write");
    fails_with(
        ctseg(&["train", "--config", TINY, "--data", s(&data)]),
        2,
        &["shard-00001.ctshard", "truncated or corrupt"],
    );
}

#[test]
fn a_folder_without_a_manifest_is_not_a_dataset() {
    let d = tempfile::tempdir().expect("tmp");
    fails_with(
        ctseg(&["train", "--config", TINY, "--data", s(d.path())]),
        2,
        &["dataset.json", "not found"],
    );
}

#[test]
fn run_directory_holds_what_the_readme_promises() {
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    let t = ok(ctseg(&[
        "train",
        "--config",
        TINY,
        "--out",
        run.to_str().unwrap_or(""),
        "--threads",
        "2",
    ]));
    assert!(t.contains("Dice liver"), "{t}");
    let steps = raw_records(&run, "step");
    assert_eq!(steps.len(), 15, "3 epochs × 5 steps");
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["step"].as_u64(), Some(i as u64 + 1));
        for k in [
            "epoch",
            "wall_s",
            "loss",
            "lr",
            "images_per_s",
            "data_wait_s",
        ] {
            assert!(s[k].is_number(), "step record lacks {k}: {s}");
        }
    }
    let vals = raw_records(&run, "val");
    assert_eq!(vals.len(), 3, "one validation per epoch");
    for v in &vals {
        for k in [
            "epoch",
            "step",
            "wall_s",
            "val_loss",
            "dice_liver",
            "dice_tumour",
        ] {
            assert!(v[k].is_number(), "val record lacks {k}: {v}");
        }
        assert_eq!(v["soft_dice"].as_array().map(Vec::len), Some(3));
        assert_eq!(
            v["images"].as_u64(),
            Some(4),
            "one held-out volume of 4 slices"
        );
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).expect("summary"))
            .expect("json");
    assert_eq!(summary["steps"].as_u64(), Some(15));
    assert_eq!(summary["dice_liver"], vals[2]["dice_liver"]);
    let resolved = std::fs::read_to_string(run.join("config.resolved.toml")).expect("resolved");
    assert!(resolved.contains("width = 4"), "{resolved}");
}

fn step_losses(run: &Path) -> Vec<(u64, f64)> {
    metrics(run)
        .steps
        .iter()
        .map(|s| (s.step, s.loss))
        .collect()
}

#[test]
fn resume_reproduces_the_uninterrupted_run_step_for_step() {
    let d = tempfile::tempdir().expect("tmp");
    let full = d.path().join("full");
    let part = d.path().join("part");
    ok(ctseg(&[
        "train",
        "--config",
        TINY,
        "--out",
        full.to_str().unwrap_or(""),
        "--quiet",
    ]));
    // Stop mid-epoch (step 7 of 15: epoch 2, batch 2), then resume with the limit lifted.
    ok(ctseg(&[
        "train",
        "--config",
        TINY,
        "--out",
        part.to_str().unwrap_or(""),
        "--max-steps",
        "7",
        "--quiet",
    ]));
    assert_eq!(step_losses(&part).len(), 7);
    let t = ok(ctseg(&[
        "train",
        "--resume",
        part.to_str().unwrap_or(""),
        "--max-steps",
        "0",
    ]));
    assert!(t.contains("resumed at step 7 (epoch 2, batch 2)"), "{t}");
    let (a, b) = (step_losses(&full), step_losses(&part));
    assert_eq!(a.len(), 15);
    // Bit-for-bit: the CPU backend is deterministic, dropout masks are keyed by step, the sampler
    // by epoch, and the checkpoint holds the exact weights, BN statistics and Adam state.
    assert_eq!(
        a, b,
        "resumed loss curve differs from the uninterrupted one"
    );
    let (va, vb) = (metrics(&full).vals, metrics(&part).vals);
    assert_eq!(
        va.last().map(|v| v.dice_liver),
        vb.last().map(|v| v.dice_liver)
    );
}

#[test]
fn divergence_stops_names_the_step_and_keeps_the_last_checkpoint() {
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    // One good epoch (5 steps, checkpoint at step 5), then resume with an absurd learning rate.
    ok(ctseg(&[
        "train",
        "--config",
        TINY,
        "--out",
        run.to_str().unwrap_or(""),
        "--epochs",
        "1",
        "--quiet",
    ]));
    let before = std::fs::read(run.join("checkpoint.ctck")).expect("checkpoint");
    let t = fails_with(
        ctseg(&[
            "train",
            "--resume",
            run.to_str().unwrap_or(""),
            "--epochs",
            "3",
            // Adam moves every weight by about lr per step. At 1e30 the CPU's fused batch norm
            // (float64 statistics) keeps the training loss finite, since BatchNorm undoes the
            // scale; at 1e38 the running statistics overflow f32 and the validation loss is NaN.
            "--lr",
            "1e38",
            "--quiet",
        ]),
        3,
        &["training diverged", "at step", "last good checkpoint"],
    );
    let step: u64 = t
        .split("at step ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .expect("step number in the message");
    assert!(step > 5, "{t}");
    // The last good checkpoint is untouched and still loads.
    assert_eq!(
        std::fs::read(run.join("checkpoint.ctck")).expect("checkpoint"),
        before
    );
    let ck =
        ctseg::rundir::Checkpoint::load(&run.join("checkpoint.ctck")).expect("checkpoint loads");
    assert_eq!(ck.meta.step, 5);
    let logged = step_losses(&run);
    assert!(
        logged.iter().all(|(_, l)| l.is_finite()),
        "no NaN is logged: {logged:?}"
    );
}

#[test]
fn gpu_backend_trains_end_to_end() {
    let adapters = ctseg::backend::list_adapters();
    if adapters.is_empty() {
        assert!(
            std::env::var("CTSEG_REQUIRE_GPU").map_or(true, |v| v != "1"),
            "CTSEG_REQUIRE_GPU=1 but no adapter"
        );
        // Without an adapter the command fails with the list and the remedy.
        fails_with(
            ctseg(&["train", "--config", TINY, "--backend", "gpu"]),
            1,
            &["no graphics adapter", "lavapipe"],
        );
        return;
    }
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    let t = ok(ctseg(&[
        "train",
        "--config",
        TINY,
        "--backend",
        "gpu",
        "--out",
        run.to_str().unwrap_or(""),
        "--max-steps",
        "6",
    ]));
    assert!(t.contains("gpu (burn wgpu"), "{t}");
    assert_eq!(losses(&run).len(), 6);
    assert!(
        metrics(&run)
            .vals
            .last()
            .is_some_and(|v| v.dice_liver.is_finite())
    );
    // An adapter index that does not exist: the error lists what there is.
    fails_with(
        ctseg(&[
            "train",
            "--config",
            TINY,
            "--backend",
            "gpu",
            "--adapter",
            "99",
        ]),
        2,
        &["--adapter 99", "[0]"],
    );
}

#[test]
fn train_refuses_a_directory_holding_a_run_unless_resume_or_overwrite() {
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--config",
            TINY,
            "--out",
            s(&run),
            "--max-steps",
            "2",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        ctseg(&args)
    };
    ok(train(&[]));
    let before = std::fs::read(run.join("metrics.jsonl")).expect("metrics");
    let ck = std::fs::read(run.join("checkpoint.ctck")).expect("checkpoint");
    fails_with(
        train(&[]),
        2,
        &["already holds a run", "--resume", "--overwrite"],
    );
    assert_eq!(
        std::fs::read(run.join("metrics.jsonl")).expect("metrics"),
        before
    );
    assert_eq!(
        std::fs::read(run.join("checkpoint.ctck")).expect("checkpoint"),
        ck
    );
    // --overwrite replaces the run: a fresh series of two steps, not four.
    ok(train(&["--overwrite"]));
    assert_eq!(losses(&run).len(), 2);
}

#[test]
fn resuming_a_finished_run_does_nothing_and_says_so() {
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    ok(ctseg(&[
        "train",
        "--config",
        TINY,
        "--out",
        s(&run),
        "--max-steps",
        "3",
        "--quiet",
    ]));
    let files = [
        "summary.json",
        "metrics.jsonl",
        "checkpoint.ctck",
        "best.ctck",
    ];
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(run.join(f)).expect(f))
        .collect();
    let t = ok(ctseg(&["train", "--resume", s(&run)]));
    assert!(t.contains("already ran all its 3 steps"), "{t}");
    for (f, b) in files.iter().zip(&before) {
        assert_eq!(&std::fs::read(run.join(f)).expect(f), b, "{f} changed");
    }
}

#[test]
fn resume_refuses_options_that_would_change_the_split_or_the_model() {
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    ok(ctseg(&[
        "train",
        "--config",
        TINY,
        "--out",
        s(&run),
        "--max-steps",
        "2",
        "--quiet",
    ]));
    for (flag, value) in [("--seed", "5"), ("--fold", "0"), ("--width", "8")] {
        fails_with(
            ctseg(&["train", "--resume", s(&run), flag, value]),
            2,
            &[flag, "split or model"],
        );
    }
}

#[test]
fn two_jobs_cannot_share_a_run_directory() {
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    ok(ctseg(&[
        "train",
        "--config",
        TINY,
        "--out",
        s(&run),
        "--max-steps",
        "1",
        "--quiet",
    ]));
    // A long resume holds the lock while a second one tries.
    let mut first = std::process::Command::new(bin())
        .args([
            "train",
            "--resume",
            s(&run),
            "--epochs",
            "400",
            "--max-steps",
            "0",
            "--quiet",
        ])
        .env("RAYON_NUM_THREADS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let t0 = std::time::Instant::now();
    while steps_logged(&run) < 3 {
        assert!(t0.elapsed().as_secs() < 120, "the first job did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let second = ctseg(&["train", "--resume", s(&run), "--epochs", "400", "--quiet"]);
    let _ = first.kill();
    let _ = first.wait();
    fails_with(
        second,
        2,
        &["in use by another job", &format!("pid {}", first.id())],
    );
}

#[test]
fn default_run_directories_of_concurrent_jobs_differ() {
    let d = tempfile::tempdir().expect("tmp");
    let spawn = || {
        std::process::Command::new(bin())
            .args(["train", "--config", TINY, "--max-steps", "1", "--quiet"])
            .current_dir(d.path())
            .env("RAYON_NUM_THREADS", "1")
            .spawn()
            .expect("spawn")
    };
    let (mut a, mut b) = (spawn(), spawn());
    assert!(a.wait().expect("a").success() && b.wait().expect("b").success());
    let runs: Vec<String> = std::fs::read_dir(d.path().join("runs"))
        .expect("runs/")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert_eq!(runs.len(), 2, "{runs:?}");
    for r in &runs {
        assert_eq!(losses(&d.path().join("runs").join(r)).len(), 1, "{r}");
    }
}

#[test]
fn resume_and_validate_keep_to_the_runs_own_data() {
    let d = tempfile::tempdir().expect("tmp");
    let phantom = |out: &Path, seed: &str| {
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
            s(out),
        ]))
    };
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    phantom(&a, "1");
    phantom(&b, "2");
    let run = d.path().join("run");
    ok(ctseg(&[
        "train",
        "--config",
        TINY,
        "--data",
        s(&a),
        "--out",
        s(&run),
        "--max-steps",
        "2",
        "--quiet",
    ]));
    // Other data is refused, naming both datasets.
    fails_with(
        ctseg(&[
            "train",
            "--resume",
            s(&run),
            "--data",
            s(&b),
            "--max-steps",
            "4",
        ]),
        2,
        &[s(&a), s(&b), "pass the run's own --data"],
    );
    fails_with(
        ctseg(&["validate", "--checkpoint", s(&run), "--data", s(&b)]),
        2,
        &[s(&a), s(&b)],
    );
    // Without --data both take the run's own dataset (not phantoms).
    let t = ok(ctseg(&["validate", "--checkpoint", s(&run)]));
    assert!(t.contains("validation slices"), "{t}");
    ok(ctseg(&[
        "train",
        "--resume",
        s(&run),
        "--max-steps",
        "4",
        "--quiet",
    ]));
    assert_eq!(summary(&run).data, s(&a), "resumed on other data");
}

#[test]
fn a_checkpoint_without_validation_never_keeps_non_finite_weights() {
    // Validation every 100 epochs (so only at the end), a checkpoint every epoch: after one good
    // epoch, a resume with an absurd learning rate overflows the BN running statistics (see the
    // divergence test above) before any validation would notice.
    let d = tempfile::tempdir().expect("tmp");
    let cfg = write_config(d.path(), "c.toml", |t| {
        t.replace("val_every = 1", "val_every = 100")
    });
    let run = d.path().join("run");
    ok(ctseg(&[
        "train",
        "--config",
        s(&cfg),
        "--out",
        s(&run),
        "--epochs",
        "1",
        "--quiet",
    ]));
    let before = std::fs::read(run.join("checkpoint.ctck")).expect("checkpoint");
    fails_with(
        ctseg(&[
            "train",
            "--resume",
            s(&run),
            "--epochs",
            "3",
            "--lr",
            "1e38",
            "--quiet",
        ]),
        3,
        &["training diverged", "last good checkpoint"],
    );
    assert_eq!(
        std::fs::read(run.join("checkpoint.ctck")).expect("checkpoint"),
        before
    );
}

#[test]
fn sigterm_mid_run_checkpoints_that_step_and_resume_continues_it_exactly() {
    let d = tempfile::tempdir().expect("tmp");
    let (full, part) = (d.path().join("full"), d.path().join("part"));
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            "--config",
            TINY,
            "--epochs",
            "40",
            "--quiet",
            "--out",
            s(out),
        ]
        .map(String::from)
        .to_vec()
    };
    let a = args(&full);
    ok(ctseg(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    let job = std::process::Command::new(bin())
        .args(args(&part))
        .env("RAYON_NUM_THREADS", "2")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let t0 = std::time::Instant::now();
    while steps_logged(&part) < 7 {
        assert!(t0.elapsed().as_secs() < 120, "the job did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &job.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let out = job.wait_with_output().expect("wait");
    let t = text(&out);
    // Its own exit status: neither success nor a signal's.
    assert_eq!(out.status.code(), Some(4), "{t}");
    assert!(
        t.contains("stopped on a signal after step") && t.contains("--resume"),
        "{t}"
    );
    let ck = ctseg::rundir::Checkpoint::load(&part.join("checkpoint.ctck")).expect("checkpoint");
    let logged = losses(&part);
    assert_eq!(
        ck.meta.step as usize,
        logged.len(),
        "checkpoint at the last logged step"
    );
    assert!(
        !part.join("summary.json").exists(),
        "a stopped run has no summary"
    );
    // The resumed run continues step for step as if never stopped (CPU: bit for bit).
    ok(ctseg(&["train", "--resume", s(&part), "--quiet"]));
    assert_eq!(losses(&part), losses(&full));
    assert_eq!(summary(&part).weights_hash, summary(&full).weights_hash);
}

#[test]
fn a_training_set_smaller_than_one_batch_is_bad_input() {
    // tiny.toml trains on 5 phantom volumes of 4 slices (20 slices): a batch of 64 never fills.
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    fails_with(
        ctseg(&[
            "train",
            "--config",
            TINY,
            "--batch-size",
            "64",
            "--out",
            s(&run),
            "--quiet",
        ]),
        2,
        &["not one full batch of 64", "lower train.batch_size"],
    );
    assert!(!run.exists(), "nothing written");
}

#[test]
fn an_accumulate_beyond_the_training_set_is_refused() {
    // tiny.toml's training set has 20 slices: 100 streams would train 80 on padding alone.
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    fails_with(
        ctseg(&[
            "train",
            "--config",
            TINY,
            "--accumulate",
            "100",
            "--out",
            s(&run),
            "--quiet",
        ]),
        2,
        &["100 micro-batch stream(s)", "lower train.accumulate"],
    );
    assert!(!run.exists(), "nothing written");
}

#[test]
fn sizes_that_would_exhaust_memory_are_refused_by_their_field_before_anything_is_written() {
    // Each aborted in an allocation (or panicked on an overflowed chunk size) after the run
    // directory was made; the limits are in src/model/unet.rs, src/train/mod.rs and
    // src/config.rs. 128 × 8192² is in range field by field, not as one step's input.
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    let cases: [(&[&str], &str); 5] = [
        (&["--width", "4294967296"], "model.width"),
        (&["--size", "4294967296"], "model.input_size"),
        (&["--batch-size", "4294967296"], "train.batch_size"),
        (&["--accumulate", "1000000000000"], "train.accumulate"),
        (
            &["--size", "8192", "--batch-size", "128"],
            "one step's input",
        ),
    ];
    for (flags, field) in cases {
        let mut train = vec!["train", "--config", TINY, "--out", s(&run)];
        train.extend(flags);
        fails_with(ctseg(&train), 2, &[field]);
        assert!(!run.exists(), "train {flags:?}: nothing written");
        let mut bench = vec!["bench", "step", "--config", TINY];
        bench.extend(flags);
        fails_with(ctseg(&bench), 2, &[field]);
    }
}

#[test]
fn a_count_flag_out_of_its_range_is_refused_by_name() {
    // `--threads 100000` tried to start 100000 threads; `bench step --steps 2^64-1` panicked
    // on a capacity overflow; `phantom --size 2^32` on a zero chunk size.
    let d = tempfile::tempdir().expect("tmp");
    let out = d.path().join("out");
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "train",
                "--config",
                TINY,
                "--threads",
                "100000",
                "--out",
                s(&out),
            ],
            "--threads",
        ),
        (
            &[
                "bench",
                "step",
                "--config",
                TINY,
                "--steps",
                "18446744073709551615",
            ],
            "--steps",
        ),
        (&["bench", "kernels", "--reps", "4294967296"], "--reps"),
        (
            &[
                "phantom",
                "--count",
                "8",
                "--size",
                "4294967296",
                "--out",
                s(&out),
            ],
            "--size",
        ),
        (
            &[
                "phantom",
                "--count",
                "100000",
                "--size",
                "8192",
                "--out",
                s(&out),
            ],
            "--count",
        ),
    ];
    for (args, flag) in cases {
        fails_with(ctseg(args), 2, &[flag]);
        assert!(!out.exists(), "{args:?}: nothing written");
    }
}

#[test]
fn bench_allreduce_refuses_an_empty_size_range_and_a_link_speed_that_is_not_positive() {
    // Both printed nothing or NaN rows and exited 0.
    fails_with(
        ctseg(&[
            "bench",
            "allreduce",
            "--min-bytes",
            "8192",
            "--max-bytes",
            "1024",
        ]),
        2,
        &["--min-bytes 8192", "--max-bytes 1024"],
    );
    for bad in ["0", "nan", "-1"] {
        fails_with(
            ctseg(&["bench", "allreduce", &format!("--link-gbps={bad}")]),
            2,
            &["--link-gbps"],
        );
    }
}

#[test]
fn an_epoch_count_the_run_config_cannot_hold_is_refused_by_its_field() {
    // u64::MAX parses on the command line, but the resolved config's TOML holds signed 64-bit
    // integers: it failed with exit 1 "serialising the config".
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    fails_with(
        ctseg(&[
            "train",
            "--config",
            TINY,
            "--epochs",
            "18446744073709551615",
            "--out",
            s(&run),
            "--quiet",
        ]),
        2,
        &["train.epochs", "9223372036854775807"],
    );
    assert!(!run.exists(), "nothing written");
}

#[test]
fn the_largest_epoch_count_toml_holds_trains_until_max_steps() {
    // epochs × steps per epoch saturates instead of wrapping around u64.
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    ok(ctseg(&[
        "train",
        "--config",
        TINY,
        "--epochs",
        "9223372036854775807",
        "--max-steps",
        "2",
        "--out",
        s(&run),
        "--quiet",
    ]));
    assert_eq!(summary(&run).steps, 2);
}

/// The one JSON line of `bench step --json` output whose `bench` field is `kind`.
fn bench_line(out: &str, kind: &str) -> serde_json::Value {
    let mut lines = bench_lines(out, kind);
    assert_eq!(lines.len(), 1, "one {kind} line expected in:\n{out}");
    lines.remove(0)
}

#[test]
fn step_profile_splits_the_step_into_its_phases_in_order() {
    // Two micro-batches per step: forward and backward run twice, then their mean.
    let out = ok(ctseg(&[
        "bench",
        "step",
        "--config",
        TINY,
        "--accumulate",
        "2",
        "--warmup",
        "0",
        "--steps",
        "1",
        "--profile",
        "2",
        "--json",
    ]));
    let p = bench_line(&out, "profile");
    let phases: Vec<&str> = p["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .map(|r| r["phase"].as_str().expect("name"))
        .collect();
    assert_eq!(
        phases,
        [
            "forward",
            "backward",
            "micro_mean",
            "exchange",
            "optimiser",
            "loss_read"
        ]
    );
    // The CPU backend launches no GPU kernels; the phases still take time.
    assert_eq!(p["launches_per_step"], 0.0);
    let wall = |i: usize| p["phases"][i]["wall_s"].as_f64().expect("wall");
    assert!(wall(0) > 0.0 && wall(1) > 0.0, "{p}");
}

#[test]
fn bench_step_reports_the_hosts_issue_time_as_part_of_compute() {
    // The host's time to issue forward, loss and backward is measured before the step waits for
    // the device, so it is a part of the compute time (the whole of it on the CPU backend,
    // where every operation runs as it is issued).
    let out = ok(ctseg(&[
        "bench", "step", "--config", TINY, "--warmup", "0", "--steps", "2", "--json",
    ]));
    let r = bench_line(&out, "ctseg");
    let (issue, compute) = (
        r["issue_s"].as_f64().expect("issue_s"),
        r["compute_s"].as_f64().expect("compute_s"),
    );
    assert!(issue > 0.0 && issue <= compute, "{r}");
    assert!(
        issue >= 0.5 * compute,
        "on the CPU issuing is computing: {r}"
    );
}

#[test]
fn mixed_precision_on_the_cpu_rounds_operands_and_scales_the_loss() {
    let d = tempfile::tempdir().expect("tmp");
    let (f32_run, mixed_run) = (d.path().join("f32"), d.path().join("mixed"));
    let train = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--config",
            TINY,
            "--max-steps",
            "6",
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        ok(ctseg(&args))
    };
    train(&f32_run, &["--quiet"]);
    let log = train(&mixed_run, &["--precision", "mixed"]);
    // The CPU's convolutions round their operands to f16 (the GPU check's reference), so the
    // CPU trains in mixed precision too, says so, and records it with the loss scale.
    assert!(
        log.contains("precision: mixed (3x3 convolution operands rounded to f16"),
        "{log}"
    );
    let sm = summary(&mixed_run);
    assert_eq!(sm.precision, "mixed");
    assert_eq!((sm.loss_scale, sm.skipped_steps), (Some(65_536.0), 0));
    // Its losses follow the f32 run's closely but not bit for bit (operands were rounded).
    let (a, b) = (step_losses(&f32_run), step_losses(&mixed_run));
    assert_eq!(a.len(), b.len());
    assert_ne!(a, b);
    for ((step, la), (_, lb)) in a.iter().zip(&b) {
        assert!(
            ((la - lb) / la).abs() < 0.02,
            "step {step}: f32 loss {la}, mixed {lb}"
        );
    }
}

#[test]
fn bench_step_never_writes_its_profile_over_the_config() {
    let d = tempfile::tempdir().expect("tmp");
    let config = write_config(d.path(), "c.toml", |t| t);
    let before = std::fs::read(&config).expect("read");
    fails_with(
        ctseg(&[
            "bench",
            "step",
            "--config",
            s(&config),
            "--profile",
            "1",
            "--profile-json",
            s(&config),
        ]),
        2,
        &["--profile-json", "c.toml"],
    );
    assert!(
        std::fs::read(&config).expect("read") == before,
        "config untouched"
    );
}

#[test]
fn bench_scaling_refuses_a_timeout_that_is_not_a_positive_number() {
    // `--timeout-s -1` panicked in Duration::from_secs_f64 after `--out` was made.
    let d = tempfile::tempdir().expect("tmp");
    let out = d.path().join("series");
    for bad in ["-1", "0", "nan"] {
        fails_with(
            ctseg(&[
                "bench",
                "scaling",
                "--config",
                TINY,
                "--out",
                s(&out),
                &format!("--timeout-s={bad}"),
            ]),
            2,
            &["--timeout-s", "positive number of seconds"],
        );
        assert!(!out.exists(), "{bad}: nothing written");
    }
}

#[test]
fn bench_scaling_refuses_a_rank_count_given_twice_before_running_any() {
    // The series used to run `cpu-n1` and `cpu-n2`, then fail on the second `cpu-n2`.
    let d = tempfile::tempdir().expect("tmp");
    let out = d.path().join("series");
    fails_with(
        ctseg(&[
            "bench",
            "scaling",
            "--config",
            TINY,
            "--out",
            s(&out),
            "--ranks",
            "1,2,2",
        ]),
        2,
        &["--ranks", "2 twice"],
    );
    assert!(!out.exists(), "nothing written, nothing run");
}

#[test]
fn bench_model_of_a_run_that_does_not_exist_is_bad_input() {
    // It was an I/O error on summary.json, exit 1.
    let d = tempfile::tempdir().expect("tmp");
    let missing = d.path().join("no-such-run");
    fails_with(
        ctseg(&["bench", "model", "--run", s(&missing)]),
        2,
        &["no-such-run", "not a run directory"],
    );
}

#[test]
fn bench_model_refuses_network_figures_that_would_give_infinite_rows() {
    // 1e-320 Gbit/s and an infinite latency printed rows of inf.
    let d = tempfile::tempdir().expect("tmp");
    for flag in [
        "--link-gbps=1e-320",
        "--latency-us=inf",
        "--copy-gbs=1e-320",
    ] {
        fails_with(
            ctseg(&["bench", "model", "--run", s(d.path()), flag]),
            2,
            &["--link-gbps and --copy-gbs must be"],
        );
    }
}

#[test]
fn bench_model_validating_against_a_run_that_does_not_exist_is_bad_input() {
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    ok(ctseg(&[
        "train",
        "--config",
        TINY,
        "--max-steps",
        "8",
        "--quiet",
        "--out",
        s(&run),
    ]));
    let missing = d.path().join("no-such-run");
    fails_with(
        ctseg(&[
            "bench",
            "model",
            "--run",
            s(&run),
            "--validate",
            s(&missing),
        ]),
        2,
        &["no-such-run", "not a run directory"],
    );
}

#[test]
fn report_of_a_path_that_does_not_exist_is_bad_input() {
    let d = tempfile::tempdir().expect("tmp");
    let missing = d.path().join("no-such-run");
    let out = d.path().join("report");
    fails_with(
        ctseg(&["report", s(&missing), "--out", s(&out)]),
        2,
        &["no-such-run", "not a run directory"],
    );
    assert!(!out.exists());
}

/// A directory `report` takes for a run (an empty `metrics.jsonl`): enough for refusals made
/// before any run is read.
fn run_stub(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("metrics.jsonl"), "").expect("write");
}

#[test]
fn report_refuses_a_run_given_twice_before_writing() {
    // Given directly and again through its folder, the run was drawn and tabulated as two.
    let d = tempfile::tempdir().expect("tmp");
    let runs = d.path().join("runs");
    let run = runs.join("a");
    run_stub(&run);
    let out = d.path().join("report");
    for given in [[s(&run), s(&run)], [s(&runs), s(&run)]] {
        fails_with(
            ctseg(&["report", given[0], given[1], "--out", s(&out)]),
            2,
            &["same run directory", "give each run once"],
        );
        assert!(!out.exists());
    }
}

#[test]
fn report_refuses_a_loss_target_given_twice_before_writing() {
    // It was tabulated and drawn twice.
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    run_stub(&run);
    let out = d.path().join("report");
    let args = [
        "report",
        s(&run),
        "--out",
        s(&out),
        "--loss-targets=-0.75,-0.75",
    ];
    fails_with(ctseg(&args), 2, &["--loss-targets", "-0.75 is given twice"]);
    assert!(!out.exists());
}

#[test]
fn bench_step_refuses_a_peer_precision_given_twice_before_any_step() {
    // The peer ran twice; the refusal comes before the model or the peer starts.
    let args = [
        "bench",
        "step",
        "--config",
        TINY,
        "--peer-precision",
        "f32,amp,f32",
    ];
    fails_with(ctseg(&args), 2, &["--peer-precision", "f32 is given twice"]);
}

#[test]
fn bench_kernels_refuses_a_case_given_twice_before_opening_an_adapter() {
    // `B,C,H,W` is `B,C,H,W,C`: the same layer, measured twice.
    let args = [
        "bench",
        "kernels",
        "--case",
        "1,2,8,8",
        "--case",
        "1,2,8,8,2",
    ];
    fails_with(ctseg(&args), 2, &["--case", "1,2,8,8,2 is given twice"]);
}

#[test]
fn report_of_a_damaged_summary_is_bad_input_naming_the_file_and_field() {
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    std::fs::create_dir(&run).expect("mkdir");
    std::fs::write(run.join("summary.json"), "{\"world_size\": \"two\"}").expect("write");
    let out = d.path().join("report");
    fails_with(
        ctseg(&["report", s(&run), "--out", s(&out)]),
        2,
        &["summary.json", "world_size"],
    );
    assert!(!out.exists());
}
