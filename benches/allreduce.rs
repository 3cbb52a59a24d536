//! `cargo bench --bench allreduce`: the gradient-exchange path of a livermask-sized model
//! (31.4 M parameters): copying the gradients off the device into one fused buffer and back
//! (what every rank pays per step), and the in-place allreduce itself for several message
//! sizes, with median and spread. Run plainly it measures the copies on one process (the
//! allreduce is then a no-op); built with `--features mpi` and launched by
//! `mpirun -np 2 target/release/deps/allreduce-*` it measures the real allreduce too.

use std::time::Instant;

use burn::optim::GradientsParams;
use ctseg::backend::{self, BackendKind, DeviceRequest};
use ctseg::bench::bench_allreduce;
use ctseg::comm::{Communicator, Local};
use ctseg::config::{LIVERMASK_TOML, RunConfig};
use ctseg::data::{Dataset, make_batch};
use ctseg::model::{Mode, dice_loss};
use ctseg::train::{batch_tensors, build_model, flat};
use ctseg::util::stats::spread;

fn comm() -> Result<Box<dyn Communicator>, Box<dyn std::error::Error>> {
    #[cfg(feature = "mpi")]
    if ctseg::comm::launched_by_mpi() {
        return Ok(Box::new(ctseg::comm::mpi::Mpi::init()?));
    }
    Ok(Box::new(Local))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let comm = comm()?;
    let mut cfg = RunConfig::from_toml(LIVERMASK_TOML, std::path::Path::new("livermask"))?;
    // Gradients of the full-width model from a small input (the gradient size does not depend on it).
    cfg.model.input_size = 32;
    cfg.train.batch_size = 1;
    let be = backend::open(&DeviceRequest {
        kind: BackendKind::Cpu,
        threads: 0,
        adapter: None,
        gpu_conv: Default::default(),
        cooperative_matrices: true,
    })?;
    let ad = be.device.clone().autodiff();
    let model = build_model(&cfg, &ad, be.caps);
    let ds = Dataset::phantom(1, 1, 1, 32, 1);
    let batch = make_batch(&ds, &cfg.data, 3, &[0]);
    let (x, y) = batch_tensors(&batch, &ad);
    let loss = dice_loss(model.forward(x, Mode::Eval), y, 0.0);
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let slots = flat::layout(&model, flat::Select::Trainable);
    let n: usize = slots.iter().map(|s| s.len).sum();
    let (mut down, mut up) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let t = Instant::now();
        let buf = flat::flatten_grads(&model, &grads)?;
        down.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let g = flat::unflatten_grads(&buf, &slots, &ad)?;
        drop(g);
        up.push(t.elapsed().as_secs_f64());
    }
    if comm.rank() == 0 {
        for (what, t) in [
            ("gradients → fused host buffer", &down),
            ("fused host buffer → gradients", &up),
        ] {
            let s = spread(t);
            println!(
                "{what}: {n} values ({:.1} MB): median {:.4} s [min {:.4}, max {:.4}, IQR {:.4}] = {:.2} GB/s",
                4.0 * n as f64 / 1e6,
                s.median,
                s.min,
                s.max,
                s.iqr,
                4.0 * n as f64 / s.median / 1e9
            );
        }
    }
    if comm.size() == 1 {
        println!(
            "allreduce: one process (no MPI peers); launch under mpirun for the allreduce rows, e.g. mpirun -np 2 target/release/deps/allreduce-* (built with --features mpi)"
        );
        return Ok(());
    }
    let rows = bench_allreduce(comm.as_ref(), 1 << 20, 128 << 20, None)?;
    if comm.rank() == 0 {
        for r in rows {
            println!(
                "allreduce {} rank(s) {:>10} B: median {:.3} ms (min {:.3}, {} reps) | busbw {:.3} GB/s",
                r.ranks,
                r.bytes,
                r.median_s * 1e3,
                r.min_s * 1e3,
                r.iters,
                r.busbw_gbs
            );
        }
    }
    Ok(())
}
