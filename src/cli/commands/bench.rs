//! `ctseg bench step|allreduce|scaling|model|kernels`.

use anyhow::{Context, Result};

use ctseg::bench::conv_choice::ConvWorkload;
use ctseg::bench::{self, StepBenchOptions};
use ctseg::error::Error;

use super::{open_backend, with_comm};
use crate::cli::args::{
    BenchAllreduceArgs, BenchKernelsArgs, BenchModelArgs, BenchScalingArgs, BenchStepArgs,
    OverrideArgs, load_config,
};

/// `ctseg bench step`: the trainer's step, timed (collective under mpirun).
pub fn step(a: BenchStepArgs) -> Result<()> {
    // Before any rank starts: each peer precision runs once, and the profile's file may be
    // none of the inputs.
    if let Some(p) = ctseg::util::first_repeat(&a.peer_precision) {
        return Err(Error::Argument(format!(
            "--peer-precision: {} is given twice; give each precision once",
            p.name()
        ))
        .into());
    }
    if let Some(path) = &a.profile_json {
        let inputs: Vec<&std::path::Path> = a
            .config
            .iter()
            .chain(&a.peer)
            .map(|p| p.as_path())
            .collect();
        ctseg::util::fs::refuse_overwriting_inputs("--profile-json", path, &inputs)?;
    }
    with_comm(|comm| {
        // 1. Config and this rank's device.
        let cfg = load_config(a.config.as_deref(), &a.overrides)?;
        let quiet = a.json || comm.rank() != 0;
        let work = ConvWorkload {
            batch: cfg.train.batch_size,
            train: true,
        };
        let be = open_backend(&a.backend, &cfg, cfg.train.precision, work, comm, quiet)?;
        let o = StepBenchOptions {
            warmup: a.warmup,
            steps: a.steps.max(1),
        };
        // 2. The timed steps.
        let r = bench::bench_step(&cfg, &be, &o, comm)?;
        // 3. The profile, after the plain steps so that it cannot disturb them.
        let profile = match a.profile {
            Some(steps) => Some(bench::profile::profile_step(&cfg, &be, steps, comm)?),
            None => None,
        };
        if comm.rank() != 0 {
            return Ok(());
        }
        // 4. The figures, and the peer's in the same invocation.
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!("{}", r.render());
        }
        if let Some(p) = &profile {
            if let Some(path) = &a.profile_json {
                let json = serde_json::to_string_pretty(p)?;
                ctseg::util::fs::write_atomic(path, json.as_bytes())?;
            }
            if a.json {
                println!("{}", serde_json::to_string(p)?);
            } else {
                print!("{}", p.render(a.profile_top));
            }
        }
        if let Some(script) = &a.peer {
            let threads = if a.backend.threads == 0 {
                rayon::current_num_threads()
            } else {
                a.backend.threads
            };
            for &precision in &a.peer_precision {
                let p = bench::run_peer(
                    &a.python,
                    script,
                    threads,
                    &cfg,
                    &o,
                    &a.peer_device,
                    precision,
                )?;
                print_peer(&r, &p, a.json)?;
            }
        }
        Ok(())
    })
}

/// The peer's figures and ctseg's ratio to them (ctseg runs in f32: against an `amp` peer the
/// ratio says what mixed precision buys PyTorch, not a like-for-like comparison).
fn print_peer(r: &bench::StepBench, p: &bench::PeerResult, json: bool) -> Result<()> {
    let ratio = r.median_step_s / p.median_step_s;
    let rss_ratio = r.peak_rss_mb / p.peak_rss_mb;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "peer", "peer": p, "ratio_ctseg_over_peer": ratio,
                "rss_ratio_ctseg_over_peer": rss_ratio,
            })
        );
        return Ok(());
    }
    let how = match (&p.amp_dtype, p.cudnn_allow_tf32) {
        (Some(dtype), _) => format!(
            "amp {dtype}, final loss scale {}, {} skipped steps",
            p.loss_scale.unwrap_or(f64::NAN),
            p.skipped_steps
        ),
        (None, Some(tf32)) if p.device.starts_with("cuda") => {
            format!("f32, cuDNN TF32 {}", if tf32 { "on" } else { "off" })
        }
        (None, _) => "f32".into(),
    };
    println!(
        "pytorch {} ({}, {how}): median {:.3} s (min {:.3}) | {:.2} img/s | peak RSS {:.0} MB",
        p.torch, p.device, p.median_step_s, p.min_step_s, p.images_per_s, p.peak_rss_mb
    );
    println!(
        "ratio ctseg f32 / pytorch {}: step time {ratio:.2}x (peak RSS {rss_ratio:.2}x)",
        p.precision
    );
    Ok(())
}

/// `ctseg bench kernels`: ctseg's GPU kernels against burn's, a row printed as each is measured.
pub fn kernels(a: BenchKernelsArgs) -> Result<()> {
    use ctseg::backend::{BackendKind, DeviceRequest};
    use ctseg::bench::kernels::{self, KernelBenchOptions, LIVERMASK_CASES};
    // 0. Each case once: a repeated one would only be measured again, as a second row.
    if let Some(c) = ctseg::util::first_repeat(&a.cases) {
        return Err(
            Error::Argument(format!("--case: {c} is given twice; give each case once")).into(),
        );
    }
    // 1. The adapter, with burn's convolutions and cooperative matrices where it has them (each
    // comparison sets the path it times).
    let be = ctseg::backend::open(&DeviceRequest {
        kind: BackendKind::Gpu,
        threads: 0,
        adapter: a.adapter,
        gpu_conv: ctseg::model::GpuConv::Burn,
        cooperative_matrices: true,
    })?;
    let cases = if a.cases.is_empty() {
        LIVERMASK_CASES[..a
            .first
            .unwrap_or(LIVERMASK_CASES.len())
            .min(LIVERMASK_CASES.len())]
            .to_vec()
    } else {
        a.cases
    };
    let o = KernelBenchOptions {
        reps: a.reps,
        cases,
    };
    // 2. The comparisons, printed as they are measured.
    let route = kernels::route(&be)?;
    if !a.json {
        println!("{}", be.description);
    }
    kernels::bench_kernels(&be, &route, &o, |row| {
        if a.json {
            match serde_json::to_string(row) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("bench kernels: {e}"),
            }
        } else {
            println!("{}", row.render());
        }
    })?;
    Ok(())
}

/// `ctseg bench allreduce` (collective under mpirun).
pub fn allreduce(a: BenchAllreduceArgs) -> Result<()> {
    if let Some(g) = a.link_gbps
        && !(g > 0.0 && g.is_finite())
    {
        return Err(
            Error::Argument(format!("--link-gbps {g}: expected a positive link speed")).into(),
        );
    }
    if a.min_bytes > a.max_bytes {
        return Err(Error::Argument(format!(
            "--min-bytes {} is above --max-bytes {}: no message size to time",
            a.min_bytes, a.max_bytes
        ))
        .into());
    }
    with_comm(|comm| {
        let rows = bench::bench_allreduce(comm, a.min_bytes, a.max_bytes, a.link_gbps)?;
        if comm.rank() == 0 {
            for r in &rows {
                if a.json {
                    println!("{}", serde_json::to_string(r)?);
                } else {
                    println!("{}", r.render());
                }
            }
        }
        Ok(())
    })
}

/// `ctseg bench scaling`: the config trained once per backend and rank count.
pub fn scaling(a: BenchScalingArgs) -> Result<()> {
    use ctseg::bench::scaling;
    let cfg = load_config(Some(&a.config), &OverrideArgs::default())?;
    let o = scaling::ScalingOptions {
        exe: std::env::current_exe().context("locating the ctseg executable")?,
        config: a.config.clone(),
        data: a.data.clone(),
        ranks: a.ranks.clone(),
        gpu_ranks: a.gpu_ranks.clone(),
        backends: a.backends.clone(),
        launcher: a.launcher.clone(),
        out: a.out.clone(),
        train_args: a.train_args.clone(),
        timeout_s: a.timeout_s,
    };
    let rows = scaling::run_scaling(&o, |r| eprintln!("{}", r.render()))?;
    let peer = match &a.peer {
        Some(script) => {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let steps = StepBenchOptions {
                warmup: 2,
                steps: 5,
            };
            Some(scaling::PeerLine {
                peer: bench::run_peer(
                    &a.python,
                    script,
                    threads,
                    &cfg,
                    &steps,
                    "cpu",
                    bench::PeerPrecision::F32,
                )?,
                threads,
                width: cfg.model.width,
                size: cfg.model.input_size,
                batch: cfg.train.batch_size,
            })
        }
        None => None,
    };
    let md = scaling::markdown(&a.config, &rows, peer.as_ref());
    ctseg::util::fs::write_atomic(&a.out.join("scaling.md"), md.as_bytes())?;
    print!("{md}");
    println!("results: {}", a.out.join(scaling::RESULTS).display());
    Ok(())
}

/// `ctseg bench model`: the performance model from a measured run.
pub fn model(a: BenchModelArgs) -> Result<()> {
    use ctseg::bench::model;
    // Rates below 1 bit/s or a latency above an hour are typos, and give inf rows.
    if !((1e-9..=1e9).contains(&a.link_gbps)
        && (0.0..=3.6e9).contains(&a.latency_us)
        && (1e-9..=1e9).contains(&a.copy_gbs))
    {
        return Err(Error::Argument(format!(
            "--link-gbps and --copy-gbs must be 1e-9 to 1e9 and --latency-us 0 to 3.6e9 (got {}, {} and {})",
            a.link_gbps, a.copy_gbs, a.latency_us
        ))
        .into());
    }
    let m = model::measured_from_run(&a.run, a.copy_gbs)?;
    let net = model::Network {
        link_gbps: a.link_gbps,
        latency_us: a.latency_us,
        algorithm: a.algorithm,
    };
    let targets = match &a.steps_to_target {
        Some(t) => model::parse_steps_to_target(t)?,
        None => Vec::new(),
    };
    let ranks: Vec<usize> = std::iter::successors(Some(1usize), |n| n.checked_mul(2))
        .take_while(|n| *n <= a.max_ranks.max(1))
        .collect();
    let preds = model::predict(&m, &net, &ranks, &targets);
    let dirs: Vec<&std::path::Path> = a.validate.iter().map(std::path::PathBuf::as_path).collect();
    let checks = model::validate(&m, &net, &dirs, a.copy_gbs)?;
    let md = model::markdown(&m, &net, &preds, &checks);
    print!("{md}");
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        ctseg::util::fs::write_atomic(&out.join("model.md"), md.as_bytes())?;
        let json = serde_json::json!({ "measured": m, "network": net, "predictions": preds, "validation": checks });
        ctseg::util::fs::write_atomic(
            &out.join("model.json"),
            serde_json::to_string_pretty(&json)?.as_bytes(),
        )?;
    }
    Ok(())
}
