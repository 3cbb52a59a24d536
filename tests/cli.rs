//! The `ctseg` binary end to end: configs, datasets, training runs, resume, divergence, errors.

mod common;

use std::path::Path;

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

#[test]
fn phantom_dataset_trains_and_corruption_is_caught() {
    let d = tempfile::tempdir().expect("tmp");
    let data = d.path().join("data");
    let png = d.path().join("grid.png");
    let t = ok(ctseg(&[
        "phantom",
        "--count",
        "24",
        "--size",
        "32",
        "--slices-per-volume",
        "4",
        "--out",
        data.to_str().unwrap_or(""),
        "--shard-slices",
        "10",
        "--preview",
        png.to_str().unwrap_or(""),
    ]));
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

    // Train on it.
    let run = d.path().join("run");
    ok(ctseg(&[
        "train",
        "--config",
        TINY,
        "--data",
        data.to_str().unwrap_or(""),
        "--out",
        run.to_str().unwrap_or(""),
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

    // Wrong size for the model.
    fails_with(
        ctseg(&[
            "train",
            "--config",
            TINY,
            "--size",
            "64",
            "--data",
            data.to_str().unwrap_or(""),
        ]),
        2,
        &["32x32", "model.input_size is 64"],
    );

    // Refuses to overwrite a dataset.
    fails_with(
        ctseg(&[
            "phantom",
            "--count",
            "4",
            "--size",
            "32",
            "--out",
            data.to_str().unwrap_or(""),
        ]),
        2,
        &["already exists"],
    );

    // Flip one byte of a shard: the error names the file and the checksum.
    let shard = data.join("shard-00001.ctshard");
    let mut bytes = std::fs::read(&shard).expect("shard");
    bytes[100] ^= 0x40;
    std::fs::write(&shard, bytes).expect("write");
    fails_with(
        ctseg(&[
            "train",
            "--config",
            TINY,
            "--data",
            data.to_str().unwrap_or(""),
            "--out",
            d.path().join("r2").to_str().unwrap_or(""),
        ]),
        2,
        &["shard-00001.ctshard", "checksum mismatch"],
    );
    // Truncate it: the size is checked against the header.
    let bytes = std::fs::read(&shard).expect("shard");
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).expect("write");
    fails_with(
        ctseg(&[
            "train",
            "--config",
            TINY,
            "--data",
            data.to_str().unwrap_or(""),
        ]),
        2,
        &["shard-00001.ctshard", "truncated or corrupt"],
    );
    // Not a dataset at all.
    fails_with(
        ctseg(&[
            "train",
            "--config",
            TINY,
            "--data",
            d.path().to_str().unwrap_or(""),
        ]),
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
