//! Batch normalisation (training mode) for the CPU backend as one fused autodiff operation: two
//! passes over the activations forward and two backward, where the same function written with
//! tensor operations (the portable path, [`crate::model::ops::batch_norm_train_tensor_ops`])
//! makes about twenty, each allocating a full-size tensor (after the convolutions, such passes
//! were most of a CPU step: docs/cpu-notes.md).
//!
//! With `N = batch·h·w` values per channel, `μ`, `σ²` their mean and biased variance (summed
//! in float64), `r = 1/sqrt(σ² + ε)` and `x̂ = (x − μ)·r`:
//! - forward: `y = γ·x̂ + β`;
//! - backward: `dβ = Σ dy`, `dγ = Σ dy·x̂`, `dx = γ·r·(dy − dβ/N − x̂·dγ/N)`.

use burn::tensor::{Device, Tensor, TensorData};
use burn_dispatch::backends::autodiff::NodeId;
use burn_dispatch::backends::autodiff::checkpoint::base::Checkpointer;
use burn_dispatch::backends::autodiff::checkpoint::strategy::NoCheckpointing;
use burn_dispatch::backends::autodiff::grads::Gradients;
use burn_dispatch::backends::autodiff::ops::{Backward, Ops, OpsKind};
use burn_dispatch::backends::flex::FlexTensor;
use burn_dispatch::backends::{Autodiff, Flex};
use rayon::prelude::*;

use super::{FlexOperands, f32_values, flex, flex_operand, flex_operands};

/// Per-channel statistics of one forward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    /// Mean per channel.
    pub mean: Vec<f64>,
    /// Biased variance per channel.
    pub var: Vec<f64>,
}

/// Values per partial sum: summed in f32 over 16 independent lanes (which the compiler
/// vectorises), then accumulated in float64.
const CHUNK: usize = 256;

/// `Σ f(v)` over `p`, in f32 per [`CHUNK`] values (16 lanes) and float64 across chunks.
#[inline]
fn chunked_sum(p: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    p.chunks(CHUNK)
        .map(|c| {
            let mut acc = [0.0f32; 16];
            let mut it = c.chunks_exact(16);
            for v in &mut it {
                for (a, &x) in acc.iter_mut().zip(v) {
                    *a += f(x);
                }
            }
            let tail: f32 = it.remainder().iter().map(|&x| f(x)).sum();
            (acc.iter().sum::<f32>() + tail) as f64
        })
        .sum()
}

/// `(Σ g, Σ g·(x − μ))` over paired slices, like [`chunked_sum`].
#[inline]
fn chunked_sums2(x: &[f32], g: &[f32], mu: f32) -> (f64, f64) {
    let mut out = (0.0f64, 0.0f64);
    for (xc, gc) in x.chunks(CHUNK).zip(g.chunks(CHUNK)) {
        let (mut a, mut b) = ([0.0f32; 16], [0.0f32; 16]);
        let (mut xi, mut gi) = (xc.chunks_exact(16), gc.chunks_exact(16));
        for (xv, gv) in (&mut xi).zip(&mut gi) {
            for k in 0..16 {
                a[k] += gv[k];
                b[k] += gv[k] * (xv[k] - mu);
            }
        }
        let (mut ta, mut tb) = (0.0f32, 0.0f32);
        for (&xv, &gv) in xi.remainder().iter().zip(gi.remainder()) {
            ta += gv;
            tb += gv * (xv - mu);
        }
        out.0 += (a.iter().sum::<f32>() + ta) as f64;
        out.1 += (b.iter().sum::<f32>() + tb) as f64;
    }
    out
}

/// Mean and biased variance per channel of `x` `[batch, c, hw]`: two passes (the variance
/// sums squared deviations from the mean, and the mean sums deviations from the channel's first
/// value, so a large mean costs no precision).
pub fn stats(x: &[f32], batch: usize, c: usize, hw: usize) -> Stats {
    let n = (batch * hw) as f64;
    let per: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let planes = || (0..batch).map(|b| &x[(b * c + ch) * hw..][..hw]);
            let x0 = x[ch * hw];
            let mean = x0 as f64 + planes().map(|p| chunked_sum(p, |v| v - x0)).sum::<f64>() / n;
            let m = mean as f32;
            let var = planes()
                .map(|p| {
                    chunked_sum(p, |v| {
                        let d = v - m;
                        d * d
                    })
                })
                .sum::<f64>()
                / n;
            // The f32 mean's rounding, removed: Σ(x − m)²/n = σ² + (μ − m)².
            let var = (var - (mean - m as f64).powi(2)).max(0.0);
            (mean, var)
        })
        .collect();
    Stats {
        mean: per.iter().map(|p| p.0).collect(),
        var: per.iter().map(|p| p.1).collect(),
    }
}

/// `1/sqrt(σ² + ε)` per channel.
fn inv_std(st: &Stats, eps: f64) -> Vec<f64> {
    st.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()
}

/// Forward: `y = m·(γ·(x − μ)·r + β)` for `x` `[batch, c, hw]`, with `m` the per-plane
/// (batch × channel) multiplier of a spatial dropout that follows the normalisation (1 without).
pub fn forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    st: &Stats,
    eps: f64,
    (batch, c, hw): (usize, usize, usize),
    mask: Option<&[f32]>,
) -> Vec<f32> {
    assert_eq!(x.len(), batch * c * hw, "batch-norm input size");
    let r = inv_std(st, eps);
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(plane, (yp, xp))| {
            let ch = plane % c;
            let m = mask.map_or(1.0, |m| m[plane] as f64);
            // Centred on the mean's f32 value (whose rounding goes into the shift): with
            // x·scale + shift, a mean large against the spread cost most of f32's precision.
            let mu = st.mean[ch] as f32;
            let scale = m * gamma[ch] as f64 * r[ch];
            let shift = (m * beta[ch] as f64 - scale * (st.mean[ch] - mu as f64)) as f32;
            let scale = scale as f32;
            yp.iter_mut()
                .zip(xp)
                .for_each(|(o, &v)| *o = (v - mu) * scale + shift);
        });
    y
}

/// Backward of [`forward`]: (`dx` if asked, `dγ`, `dβ`) for `x`, `dy` `[batch, c, hw]`; the
/// dropout multiplier scales `dy` plane by plane (`g = m·dy` below).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    st: &Stats,
    eps: f64,
    (batch, c, hw): (usize, usize, usize),
    mask: Option<&[f32]>,
    want_dx: bool,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let plane_mult = |plane: usize| mask.map_or(1.0, |m| m[plane] as f64);
    let r = inv_std(st, eps);
    let n = (batch * hw) as f64;
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mu, rc) = (st.mean[ch], r[ch]);
            let m = mu as f32;
            let (sd, sdc) = (0..batch).fold((0.0, 0.0), |(sd, sdc), b| {
                let o = (b * c + ch) * hw;
                let (p, q) = chunked_sums2(&x[o..o + hw], &dy[o..o + hw], m);
                let k = plane_mult(b * c + ch);
                (sd + k * p, sdc + k * q)
            });
            // Σ dy·x̂ = r·(Σ dy·(x − m) − (μ − m)·Σ dy).
            (sd, rc * (sdc - (mu - m as f64) * sd))
        })
        .collect();
    let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
    let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
    let dx = want_dx.then(|| {
        let mut dx = vec![0.0f32; x.len()];
        dx.par_chunks_mut(hw).enumerate().for_each(|(plane, out)| {
            let ch = plane % c;
            let o = plane * hw;
            let (mu, rc, g) = (st.mean[ch], r[ch], gamma[ch] as f64);
            // dx = k·g − k·mean(g) − k·x̂·mean(g·x̂), k = γ·r, x̂ = (x − μ)·r, g = m·dy
            //    = a·dy + b·(x − m) + d with a = k·m, b = −k·r·mean(g·x̂), d = −k·mean(g) −
            //    b·(μ − m), m the f32 mean (centred, as the forward).
            let k = g * rc;
            let a = (k * plane_mult(plane)) as f32;
            let m = mu as f32;
            let bx = -k * rc * sums[ch].1 / n;
            let d = (-k * sums[ch].0 / n - bx * (mu - m as f64)) as f32;
            let bx = bx as f32;
            out.iter_mut()
                .zip(&dy[o..o + hw])
                .zip(&x[o..o + hw])
                .for_each(|((v, &g), &xv)| *v = a * g + bx * (xv - m) + d);
        });
        dx
    });
    (dx, dgamma, dbeta)
}

#[derive(Debug)]
struct BatchNormBackward;

impl Backward<Flex, 3> for BatchNormBackward {
    /// Input and γ nodes, statistics, ε, dropout multipliers.
    type State = (NodeId, NodeId, Stats, f64, Option<Vec<f32>>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let [node_x, node_g, node_b] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (xs, gs, st, eps, mask) = ops.state;
        let x = ckpt.retrieve_node_output::<FlexTensor>(xs);
        let gamma = ckpt.retrieve_node_output::<FlexTensor>(gs);
        let dims = x.layout().shape().clone();
        let (b, c, hw) = (dims[0], dims[1], dims[2] * dims[3]);
        let (dx, dgamma, dbeta) = backward(
            &f32_values(&x),
            &f32_values(&dy),
            &f32_values(&gamma),
            &st,
            eps,
            (b, c, hw),
            mask.as_deref(),
            node_x.is_some(),
        );
        if let (Some(node), Some(dx)) = (node_x, dx) {
            grads.register::<Flex>(node.id, flex(dx, vec![b, c, dims[2], dims[3]]));
        }
        if let Some(node) = node_g {
            grads.register::<Flex>(node.id, flex(dgamma, vec![c]));
        }
        if let Some(node) = node_b {
            grads.register::<Flex>(node.id, flex(dbeta, vec![c]));
        }
    }
}

fn forward_flex(
    x: &FlexTensor,
    g: &FlexTensor,
    b: &FlexTensor,
    eps: f64,
    mask: Option<&[f32]>,
) -> (FlexTensor, Stats) {
    let dims = x.layout().shape().clone();
    let shape = (dims[0], dims[1], dims[2] * dims[3]);
    let xv = f32_values(x);
    let st = stats(&xv, shape.0, shape.1, shape.2);
    let y = forward(&xv, &f32_values(g), &f32_values(b), &st, eps, shape, mask);
    (flex(y, vec![dims[0], dims[1], dims[2], dims[3]]), st)
}

/// Training-mode batch normalisation on the CPU backend, optionally followed by a spatial
/// dropout given as its per-plane multipliers (`[batch·c]`, 0 or 1/(1 − p)): `Some((y, mean,
/// biased variance))` when `x`, `gamma` and `beta` are f32 tensors on the flex device (with or
/// without autodiff), `None` otherwise (the caller then uses tensor operations). The statistics
/// (of `x`, before any dropout) come back as `[c]` tensors on the device without autodiff, for
/// the running averages.
pub fn batch_norm_train(
    x: &Tensor<4>,
    gamma: &Tensor<1>,
    beta: &Tensor<1>,
    eps: f64,
    mask: Option<Vec<f32>>,
) -> Option<(Tensor<4>, Tensor<1>, Tensor<1>)> {
    let [b, c, _, _] = x.dims();
    if mask.as_ref().is_some_and(|m| m.len() != b * c) {
        return None;
    }
    let device = x.device().without_autodiff();
    let stat_tensors = |st: &Stats, device: &Device| {
        let t = |v: &[f64]| {
            let v: Vec<f32> = v.iter().map(|&m| m as f32).collect();
            Tensor::<1>::from_data(TensorData::new(v, [c]), device)
        };
        (t(&st.mean), t(&st.var))
    };
    match flex_operands([flex_operand(x), flex_operand(gamma), flex_operand(beta)])? {
        FlexOperands::Autodiff([x, g, b]) => {
            let nodes = [x.node(), g.node(), b.node()];
            let (y, st) = forward_flex(
                x.primitive(),
                g.primitive(),
                b.primitive(),
                eps,
                mask.as_deref(),
            );
            let out = match BatchNormBackward
                .prepare::<NoCheckpointing>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let xs = prep.checkpoint(&x);
                    let gs = prep.checkpoint(&g);
                    prep.finish((xs, gs, st.clone(), eps, mask), y)
                }
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            let (m, v) = stat_tensors(&st, &device);
            Some((Tensor::from_primitive::<Autodiff<Flex>>(out), m, v))
        }
        FlexOperands::Plain([x, g, b]) => {
            let (y, st) = forward_flex(&x, &g, &b, eps, mask.as_deref());
            let (m, v) = stat_tensors(&st, &device);
            Some((Tensor::from_primitive::<Flex>(y), m, v))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::BatchNorm;

    fn values(n: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + salt * 104_729) % 211) as f32 / 21.1) - 4.0 + (i % 3) as f32)
            .collect()
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f64 {
        let scale = b
            .iter()
            .fold(0.0f64, |m, v| m.max(v.abs() as f64))
            .max(1e-30);
        a.iter()
            .zip(b)
            .fold(0.0f64, |m, (p, q)| m.max((p - q).abs() as f64))
            / scale
    }

    /// The fused operation against the tensor-operation formula it replaces (burn's autodiff
    /// derives that one's gradients; the formula itself is pinned to a float64 closed form in
    /// layers.rs): output, statistics and the gradients of x, γ and β of L = Σ y·g, without
    /// and with a fused spatial dropout (against the formula times the mask).
    #[test]
    fn fused_equals_the_tensor_operation_formula() {
        let device = Device::flex().autodiff();
        let (b, c, h, w) = (3, 4, 9, 11);
        let mut bn = BatchNorm::new(c, 0.99, 1e-3, &device);
        bn.gamma = burn::module::Param::from_tensor(Tensor::from_data(
            TensorData::new(vec![0.5f32, -1.5, 2.0, 1.0], [c]),
            &device,
        ));
        bn.beta = burn::module::Param::from_tensor(Tensor::from_data(
            TensorData::new(vec![0.1f32, 0.2, -0.3, 0.0], [c]),
            &device,
        ));
        let xv = values(b * c * h * w, 1);
        let gv = values(b * c * h * w, 2);
        let v4 = |t: Tensor<4>| t.into_data().try_to_vec::<f32>().unwrap();
        let v1 = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
        // Spatial-dropout multipliers for the fused-dropout case: planes 1, 4 and 9 dropped.
        let mask: Vec<f32> = (0..b * c)
            .map(|p| if [1, 4, 9].contains(&p) { 0.0 } else { 2.0 })
            .collect();
        let run = |fused: bool, mask: Option<Vec<f32>>| {
            let x = Tensor::<4>::from_data(TensorData::new(xv.clone(), [b, c, h, w]), &device)
                .require_grad();
            let g = Tensor::<4>::from_data(TensorData::new(gv.clone(), [b, c, h, w]), &device);
            let (y, m, var) = if fused {
                batch_norm_train(&x, &bn.gamma.val(), &bn.beta.val(), bn.epsilon, mask)
                    .expect("the flex autodiff device takes the fused path")
            } else {
                let (y, m, var) = crate::model::ops::batch_norm_train_tensor_ops(
                    x.clone(),
                    bn.gamma.val(),
                    bn.beta.val(),
                    bn.epsilon,
                );
                match mask {
                    Some(mask) => {
                        let mt =
                            Tensor::<4>::from_data(TensorData::new(mask, [b, c, 1, 1]), &device);
                        (y * mt, m, var)
                    }
                    None => (y, m, var),
                }
            };
            let grads = (y.clone() * g).sum().backward();
            vec![
                v4(y.without_autodiff()),
                v1(m),
                v1(var),
                v4(x.grad(&grads).unwrap()),
                v1(bn.gamma.val().grad(&grads).unwrap()),
                v1(bn.beta.val().grad(&grads).unwrap()),
            ]
        };
        for mk in [None, Some(mask.clone())] {
            let masked = mk.is_some();
            let (ours, ops) = (run(true, mk.clone()), run(false, mk));
            for (i, name) in ["y", "mean", "var", "dx", "dgamma", "dbeta"]
                .iter()
                .enumerate()
            {
                let e = max_rel(&ours[i], &ops[i]);
                assert!(
                    e < 2e-5,
                    "dropout {masked}, {name}: max rel difference {e:e}"
                );
            }
        }
        let ours = run(true, None);
        // Without autodiff: the same output.
        let plain = Device::flex();
        let x = Tensor::<4>::from_data(TensorData::new(xv, [b, c, h, w]), &plain);
        let (y, _, _) = batch_norm_train(
            &x,
            &bn.gamma.val().without_autodiff(),
            &bn.beta.val().without_autodiff(),
            bn.epsilon,
            None,
        )
        .expect("the plain flex device takes the fused path");
        assert_eq!(v4(y), ours[0]);
    }

    /// A mean a thousand times the spread costs the output and the input gradient no
    /// precision: both against a float64 evaluation of the definition (the formulas in this
    /// module's header). Written as x·scale + shift with the mean summed from zero, the output
    /// was off by 5.8e-5 here (f32's spacing at 1,000 is 6.1e-5); centred, but with the mean
    /// summed from zero, by 2.2e-5.
    #[test]
    fn a_large_mean_costs_no_precision() {
        let (b, c, hw) = (2, 3, 50);
        let x: Vec<f32> = values(b * c * hw, 5)
            .iter()
            .map(|v| 1000.0 + v / 4.0)
            .collect();
        let dy = values(b * c * hw, 6);
        let (gamma, beta) = (vec![1.0f32, 0.5, 2.0], vec![0.0f32, 0.1, -0.2]);
        let eps = 1e-3;
        let st = stats(&x, b, c, hw);
        let y = forward(&x, &gamma, &beta, &st, eps, (b, c, hw), None);
        let (dx, _, _) = backward(&x, &dy, &gamma, &st, eps, (b, c, hw), None, true);
        let dx = dx.expect("asked for");
        let n = (b * hw) as f64;
        let (mut y64, mut dx64) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
        for ch in 0..c {
            let at: Vec<usize> = (0..b)
                .flat_map(|i| ((i * c + ch) * hw)..((i * c + ch + 1) * hw))
                .collect();
            let mean = at.iter().map(|&i| x[i] as f64).sum::<f64>() / n;
            let var = at
                .iter()
                .map(|&i| (x[i] as f64 - mean).powi(2))
                .sum::<f64>()
                / n;
            let r = 1.0 / (var + eps).sqrt();
            let xhat = |i: usize| (x[i] as f64 - mean) * r;
            let mg = at.iter().map(|&i| dy[i] as f64).sum::<f64>() / n;
            let mgx = at.iter().map(|&i| dy[i] as f64 * xhat(i)).sum::<f64>() / n;
            let k = gamma[ch] as f64 * r;
            for &i in &at {
                y64[i] = (gamma[ch] as f64 * xhat(i) + beta[ch] as f64) as f32;
                dx64[i] = (k * (dy[i] as f64 - mg - xhat(i) * mgx)) as f32;
            }
        }
        assert!(max_rel(&y, &y64) < 1e-6, "y: {:e}", max_rel(&y, &y64));
        assert!(max_rel(&dx, &dx64) < 1e-6, "dx: {:e}", max_rel(&dx, &dx64));
    }

    /// Per-channel sums run in a fixed order: the thread count changes nothing.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (b, c, hw) = (2, 5, 37);
        let x = values(b * c * hw, 3);
        let dy = values(b * c * hw, 4);
        let gamma = vec![1.0f32, 2.0, -1.0, 0.5, 3.0];
        let beta = vec![0.0f32; c];
        let all = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let st = stats(&x, b, c, hw);
                let mask: Vec<f32> = (0..b * c).map(|p| (p % 3) as f32).collect();
                let y = forward(&x, &gamma, &beta, &st, 1e-3, (b, c, hw), Some(&mask));
                (
                    y,
                    backward(&x, &dy, &gamma, &st, 1e-3, (b, c, hw), Some(&mask), true),
                    st,
                )
            })
        };
        let one = all(1);
        for t in [2, 3] {
            assert!(all(t) == one, "{t} threads differ from 1");
        }
    }
}
