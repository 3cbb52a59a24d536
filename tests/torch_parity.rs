//! Parity with PyTorch: a small livermask U-Net's loss, outputs, gradients and BN running
//! statistics, and Adadelta's trajectory, against numbers produced by
//! `python3 tests/reference/torch_reference.py` (torch 2.15.0, CPU, float32), which builds the
//! same model with the project's PyTorch peer (`tests/reference/livermask_torch.py`) and fills
//! weights and inputs with the closed-form rules written in that script and mirrored below. The
//! script is also run live and its output compared with the pinned numbers (required in CI; see
//! `tests/common`).

mod common;

use burn::module::{Module, Param};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::{Device, Tensor, TensorData};
use ctseg::model::{Mode, Norm, UNetConfig, Upsampling, dice_loss};
use ctseg::optim::Adadelta;
use ctseg::tensor_util::to_f32;
use ctseg::train::flat::{self, Select};

// ---- pinned PyTorch numbers (torch_reference.py, torch 2.15.0+cu132 on CPU) ----
const LOSS: f64 = -0.41849908232688904;
const PRED_MEAN: f64 = 0.37675318121910095;
const PRED_FIRST: [f64; 4] = [
    0.46257728338241577,
    0.43747007846832275,
    0.42782101035118103,
    0.44063276052474976,
];
const GRAD_FIRST_CONV_W: [f64; 6] = [
    -0.0027361270040273666,
    -0.006129834800958633,
    -0.009729667566716671,
    0.036171674728393555,
    0.03633296489715576,
    0.037152744829654694,
];
const GRAD_FIRST_CONV_B: [f64; 4] = [
    0.010596106760203838,
    -0.029289353638887405,
    -0.011525735259056091,
    -0.0337672159075737,
];
const GRAD_BOTTLENECK_GAMMA: [f64; 4] = [
    -0.023514101281762123,
    -0.002609529532492161,
    0.036378029733896255,
    -0.008335346356034279,
];
const GRAD_HEAD_W: [f64; 6] = [
    -0.005065660458058119,
    -0.00638154149055481,
    -0.018015597015619278,
    -0.039041001349687576,
    -0.018366720527410507,
    -0.004065033048391342,
];
const GRAD_HEAD_B: [f64; 3] = [
    -0.03258052468299866,
    -0.026350120082497597,
    0.01978306844830513,
];
const GRAD_NORM: f64 = 1.5426291771285123;
const FIRST_BN_RUNNING_MEAN: f64 = 0.151143416762352;
const FIRST_BN_RUNNING_VAR: f64 = 18.185226440429688;
const ADADELTA_W: [[f64; 4]; 6] = [
    [
        -0.0014142110012471676,
        0.10141421109437943,
        0.19858579337596893,
        0.29858580231666565,
    ],
    [
        -0.0028331622015684843,
        0.10284192115068436,
        0.19715262949466705,
        0.29716214537620544,
    ],
    [
        -0.004246164578944445,
        0.1042756661772728,
        0.1957060694694519,
        0.29573801159858704,
    ],
    [
        -0.005647875368595123,
        0.10571170598268509,
        0.19424891471862793,
        0.2943178415298462,
    ],
    [
        -0.007035164162516594,
        0.10714781284332275,
        0.192782923579216,
        0.292904257774353,
    ],
    [
        -0.008406037464737892,
        0.1085825115442276,
        0.19130928814411163,
        0.29149895906448364,
    ],
];

const W: usize = 4;
const DEPTH: usize = 2;
const N: usize = 32;
const B: usize = 2;

/// The test model: livermask blocks, width 4, depth 2, 32², PyTorch's BN (eps 1e-3, momentum
/// 0.01 = keep 0.99, as the peer sets).
fn config() -> UNetConfig {
    config_of(W, DEPTH, N)
}

fn config_of(width: usize, depth: usize, n: usize) -> UNetConfig {
    UNetConfig {
        width,
        depth,
        input_size: n,
        classes: 3,
        upsampling: Upsampling::Nearest,
        dropout: 0.0,
        norm: Norm::Batch,
        bn_momentum: 0.99,
        bn_epsilon: 1e-3,
    }
}

/// The closed-form weights of torch_reference.py, in trainable-parameter order.
fn fill<M: Module>(model: M) -> M {
    let slots = flat::layout(&model, Select::Trainable);
    let mut values = Vec::new();
    for (k, s) in slots.iter().enumerate() {
        let sines = (0..s.len).map(|j| (0.37 * j as f64 + 1.3 * k as f64 + 0.5).sin());
        let prev_is_conv = k > 0 && slots[k - 1].shape.len() == 4;
        let next_is_vec = slots.get(k + 1).is_some_and(|n| n.shape.len() == 1);
        let v: Vec<f32> = if s.shape.len() == 4 {
            let fan_in = (s.shape[1] * s.shape[2] * s.shape[3]) as f64;
            sines.map(|x| ((3.0 / fan_in).sqrt() * x) as f32).collect()
        } else if prev_is_conv || (k + 1 == slots.len()) {
            sines.map(|x| (0.05 * x) as f32).collect() // conv bias
        } else if next_is_vec {
            sines.map(|x| (1.0 + 0.1 * x) as f32).collect() // BN gamma (followed by beta)
        } else {
            sines.map(|x| (0.1 * x) as f32).collect() // BN beta (followed by a conv weight)
        };
        values.extend(v);
    }
    flat::assign_values(model, Select::Trainable, &values).expect("layout")
}

fn batch(device: &Device) -> (Tensor<4>, Tensor<4>) {
    batch_of(N, B, device)
}

/// The closed-form batch of torch_reference.py at size `n` (labels scaled by n / 32).
fn batch_of(n: usize, bs: usize, device: &Device) -> (Tensor<4>, Tensor<4>) {
    let sc = n as f64 / 32.0;
    let x: Vec<f32> = (0..bs * n * n)
        .map(|j| {
            let b = (j / (n * n)) as f64;
            let j = j as f64;
            (50.0 * (0.11 * j).sin() + 20.0 * (0.023 * j).cos() + 30.0 * b) as f32
        })
        .collect();
    let mut y = vec![0.0f32; bs * 3 * n * n];
    for b in 0..bs {
        for yy in 0..n {
            for xx in 0..n {
                let (fy, fx) = (yy as f64, xx as f64);
                let liver = (fy - 12.0 * sc).powi(2) + (fx - (13.0 + 5.0 * b as f64) * sc).powi(2)
                    < 64.0 * sc * sc;
                let tumour =
                    (fy - 12.0 * sc).powi(2) + (fx - 15.0 * sc).powi(2) < 9.0 * sc * sc && liver;
                let o = yy * n + xx;
                y[(b * 3) * n * n + o] = (!liver) as u8 as f32;
                y[(b * 3 + 1) * n * n + o] = liver as u8 as f32;
                y[(b * 3 + 2) * n * n + o] = tumour as u8 as f32;
            }
        }
    }
    (
        Tensor::from_data(TensorData::new(x, [bs, 1, n, n]), device),
        Tensor::from_data(TensorData::new(y, [bs, 3, n, n]), device),
    )
}

fn close(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol * want.abs().max(1e-2),
        "{what}: ctseg {got} vs PyTorch {want} (relative tolerance {tol})"
    );
}

#[test]
fn small_unet_matches_pytorch() {
    let device = Device::flex().autodiff();
    let model = fill(config().init(0, &device));
    let (x, y) = batch(&device);
    let pred = model.forward(
        x,
        Mode::Train {
            seed: 0,
            step: 0,
            stream: 0,
        },
    );
    let p = to_f32(pred.clone()).expect("pred");
    let loss = dice_loss(pred, y, 0.0);
    let loss_v = to_f32(loss.clone()).expect("loss")[0] as f64;
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let g = flat::flatten_grads(&model, &grads).expect("grads");
    let slots = flat::layout(&model, Select::Trainable);
    let offset = |k: usize| slots[..k].iter().map(|s| s.len).sum::<usize>();

    // Tolerances: f32 sums in a different order; the loss is a ratio of sums over ~2000 values.
    close(loss_v, LOSS, 1e-5, "loss");
    close(
        p.iter().map(|&v| v as f64).sum::<f64>() / p.len() as f64,
        PRED_MEAN,
        1e-5,
        "mean prediction",
    );
    for (i, want) in PRED_FIRST.iter().enumerate() {
        close(p[i] as f64, *want, 1e-5, "prediction");
    }
    // Trainable order: block = [gamma, beta, conv.w, conv.b]; first block's conv is slot 2.
    for (i, want) in GRAD_FIRST_CONV_W.iter().enumerate() {
        close(
            g[offset(2) + i] as f64,
            *want,
            2e-3,
            "first conv weight gradient",
        );
    }
    for (i, want) in GRAD_FIRST_CONV_B.iter().enumerate() {
        close(
            g[offset(3) + i] as f64,
            *want,
            2e-3,
            "first conv bias gradient",
        );
    }
    // Bottleneck = encoder level DEPTH, first block: blocks before it = 2·DEPTH, 4 slots each.
    let bott = 4 * 2 * DEPTH;
    for (i, want) in GRAD_BOTTLENECK_GAMMA.iter().enumerate() {
        close(
            g[offset(bott) + i] as f64,
            *want,
            2e-3,
            "bottleneck BN gamma gradient",
        );
    }
    let head = slots.len() - 2;
    for (i, want) in GRAD_HEAD_W.iter().enumerate() {
        close(
            g[offset(head) + i] as f64,
            *want,
            2e-3,
            "head weight gradient",
        );
    }
    for (i, want) in GRAD_HEAD_B.iter().enumerate() {
        close(
            g[offset(head + 1) + i] as f64,
            *want,
            2e-3,
            "head bias gradient",
        );
    }
    let norm = g.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
    close(norm, GRAD_NORM, 1e-4, "gradient norm");

    let buffers = flat::flatten_values(&model, Select::Buffers).expect("buffers");
    close(
        buffers[0] as f64,
        FIRST_BN_RUNNING_MEAN,
        1e-5,
        "first BN running mean",
    );
    close(
        buffers[1] as f64,
        FIRST_BN_RUNNING_VAR,
        1e-5,
        "first BN running variance (unbiased)",
    );
}

#[derive(Module, Debug)]
struct Weights {
    w: Param<Tensor<1>>,
}

#[test]
fn adadelta_follows_torch_trajectory() {
    let device = Device::flex().autodiff();
    let a: Vec<f32> = (0..5)
        .flat_map(|i| (0..4).map(move |j| ((i + 2 * j + 1) as f64).sin() as f32))
        .collect();
    let b: Vec<f32> = (0..5).map(|i| ((3 * i) as f64).cos() as f32).collect();
    let a = Tensor::<2>::from_data(TensorData::new(a, [5, 4]), &device);
    let b = Tensor::<1>::from_data(TensorData::new(b, [5]), &device);
    let mut m = Weights {
        w: Param::from_tensor(Tensor::from_data(
            TensorData::new(vec![0.0f32, 0.1, 0.2, 0.3], [4]),
            &device,
        )),
    };
    fn is_burn_optimizer<O: Optimizer>(o: O) -> O {
        o
    }
    let mut opt = burn::optim::ModuleOptimizer::from(is_burn_optimizer(Adadelta {
        rho: 0.95,
        epsilon: 1e-7,
        weight_decay: 0.0,
    }));
    for (step, want) in ADADELTA_W.iter().enumerate() {
        let r = a.clone().matmul(m.w.val().reshape([4, 1])).reshape([5]) - b.clone();
        let loss = (r.clone() * r).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        m = opt.step(1.0, m, grads);
        let w = to_f32(m.w.val()).expect("w");
        for (k, (g, e)) in w.iter().zip(want).enumerate() {
            assert!(
                (*g as f64 - e).abs() < 1e-6,
                "step {} w[{k}]: ctseg {g} vs torch.optim.Adadelta {e}",
                step + 1
            );
        }
    }
}

#[test]
fn live_pytorch_agrees_when_available() {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/reference/torch_reference.py"
    );
    let Some(stdout) =
        common::python_reference("torch_reference.py", &["torch", "numpy"], &[script], &[])
    else {
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let loss = v["loss"].as_f64().expect("loss");
    // Other PyTorch versions and CPUs may order sums differently: same tolerance as above.
    close(loss, LOSS, 1e-5, "live PyTorch loss vs pinned");
    close(
        v["grad_norm"].as_f64().expect("norm"),
        GRAD_NORM,
        1e-4,
        "live PyTorch gradient norm",
    );
}

/// Loss and per-tensor gradients of the closed-form model and batch on burn flex; with
/// `transposed`, of the transposed problem (images and kernels transposed, kernel gradients
/// transposed back), which is the same mathematics summed in another order.
fn flex_grads(
    width: usize,
    depth: usize,
    n: usize,
    b: usize,
    transposed: bool,
) -> (f64, Vec<Vec<f32>>) {
    use ctseg::verify::transpose_last2;
    let device = Device::flex().autodiff();
    let mut model = fill(config_of(width, depth, n).init(0, &device));
    let slots = flat::layout(&model, Select::Trainable);
    let swap = |v: &[f32], shape: &[usize]| -> Vec<f32> {
        if shape.len() == 4 {
            transpose_last2(v, shape)
        } else {
            v.to_vec()
        }
    };
    if transposed {
        let values = flat::flatten_values(&model, Select::Trainable).expect("values");
        let mut t = Vec::new();
        let mut o = 0;
        for s in &slots {
            t.extend(swap(&values[o..o + s.len], &s.shape));
            o += s.len;
        }
        model = flat::assign_values(model, Select::Trainable, &t).expect("assign");
    }
    let (x, y) = batch_of(n, b, &device);
    let (x, y) = if transposed {
        (x.swap_dims(2, 3), y.swap_dims(2, 3))
    } else {
        (x, y)
    };
    let mode = Mode::Train {
        seed: 0,
        step: 0,
        stream: 0,
    };
    let loss = dice_loss(model.forward(x, mode), y, 0.0);
    let loss_v = to_f32(loss.clone()).expect("loss")[0] as f64;
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let g = flat::flatten_grads(&model, &grads).expect("grads");
    let mut out = Vec::new();
    let mut o = 0;
    for s in &slots {
        // Kernels are square, so swapping back uses the same shape.
        let part = &g[o..o + s.len];
        out.push(if transposed {
            swap(part, &s.shape)
        } else {
            part.to_vec()
        });
        o += s.len;
    }
    (loss_v, out)
}

/// The CPU reference itself at livermask's resolution and depth (240², depth 4; narrow:
/// width 2, batch 2, so it runs in seconds): every gradient tensor against PyTorch's, run live
/// (`torch_reference.py --grads`). The accepted error per tensor is `verify`'s rule: 1e-3, or
/// 20× the f32 noise measured as flex against itself on the transposed problem. (At this shape
/// PyTorch's own f32 gradients are up to 3.9 % away from its f64 ones, so no fixed tolerance
/// works.) This is the reference the GPU check trusts.
#[test]
fn flex_matches_pytorch_at_240_and_depth_4() {
    let (w, d, n, b) = (2, 4, 240, 2);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/reference/torch_reference.py"
    );
    let shape = format!("{w},{d},{n},{b}");
    let Some(stdout) = common::python_reference(
        "torch_reference.py --grads",
        &["torch", "numpy"],
        &[script, "--grads"],
        &[("CTSEG_REF_SHAPE", shape.as_str())],
    ) else {
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let torch_loss = v["loss"].as_f64().expect("loss");
    let torch: Vec<Vec<f32>> = v["grads"]
        .as_array()
        .expect("grads")
        .iter()
        .map(|t| {
            t.as_array()
                .expect("tensor")
                .iter()
                .map(|x| x.as_f64().expect("number") as f32)
                .collect()
        })
        .collect();
    let (loss, ours) = flex_grads(w, d, n, b, false);
    let (_, transposed) = flex_grads(w, d, n, b, true);
    assert_eq!(ours.len(), torch.len(), "parameter tensors");
    for (o, t) in ours.iter().zip(&torch) {
        assert_eq!(o.len(), t.len());
    }
    let verdict = ctseg::verify::verdict(loss, torch_loss, &ours, &torch, &transposed);
    eprintln!("flex vs PyTorch at {n}², depth {d}:\n{}", verdict.table());
    assert!(
        verdict.passes(),
        "flex disagrees with PyTorch:\n{}",
        verdict.table()
    );
}

#[test]
fn bench_step_runs_the_pytorch_peer_in_f32_and_in_amp() {
    // The peer in both precisions in one invocation, as scripts/gpu_device_check.sh runs it on
    // CUDA: each line says what the peer ran in, beside ctseg's ratio to it.
    if common::python_reference("peer", &["torch"], &["-c", "pass"], &[]).is_none() {
        return;
    }
    let out = common::ok(common::ctseg(&[
        "bench",
        "step",
        "--config",
        common::TINY,
        "--warmup",
        "0",
        "--steps",
        "1",
        "--peer",
        common::s(&common::reference_script("livermask_torch.py")),
        "--python",
        &common::python(),
        "--peer-precision",
        "f32,amp",
        "--json",
    ]));
    let peers = common::bench_lines(&out, "peer");
    assert_eq!(peers.len(), 2, "{out}");
    let (f32_run, amp) = (&peers[0]["peer"], &peers[1]["peer"]);
    assert_eq!(f32_run["precision"], "f32");
    assert!(f32_run["amp_dtype"].is_null());
    assert!(f32_run["cudnn_allow_tf32"].is_boolean(), "{f32_run}");
    // On the CPU autocast runs in bfloat16; GradScaler starts at 2^16 and halves once per
    // skipped step (it doubles only after 2000 finite steps).
    assert_eq!(amp["precision"], "amp");
    assert_eq!(amp["amp_dtype"], "bfloat16");
    let skipped = amp["skipped_steps"].as_u64().expect("skipped");
    assert_eq!(
        amp["loss_scale"].as_f64(),
        Some(65536.0 * 0.5f64.powi(skipped as i32))
    );
    for p in &peers {
        let r = p["ratio_ctseg_over_peer"].as_f64().expect("ratio");
        assert!(r.is_finite() && r > 0.0, "{p}");
    }
}

#[test]
fn loss_scale_follows_torch_grad_scaler() {
    // Overflow flags per step: a burst of three at the start, two more after a doubling, and one
    // late, over 5,000 steps, so that growth (after 2,000 finite steps), back-off and the restart
    // of the count after a skip each happen more than once.
    let flags: String = (0..5_000)
        .map(|i| {
            if [100, 101, 102, 2_500, 2_501, 4_700].contains(&i) {
                '1'
            } else {
                '0'
            }
        })
        .collect();
    let script = common::reference_script("grad_scaler.py");
    let Some(stdout) = common::python_reference(
        "grad_scaler.py",
        &["torch"],
        &[common::s(&script), &flags],
        &[],
    ) else {
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let mut ours = ctseg::train::scaler::LossScale::default();
    assert_eq!(Some(ours.scale), v["init_scale"].as_f64());
    for (i, c) in flags.chars().enumerate() {
        let applied = ours.update(c == '0');
        assert_eq!(
            (ours.scale, ours.growth_tracker, applied),
            (
                v["scale"][i].as_f64().expect("scale"),
                v["tracker"][i].as_u64().expect("tracker"),
                v["applied"][i].as_bool().expect("applied"),
            ),
            "step {i}"
        );
    }
    assert_eq!(ours.skipped, 6);
}
