//! The U-Net's data-movement layers for the CPU backend, each one autodiff operation of one pass
//! forward and one backward: 2×2 max-pooling, and the decoder's "nearest ×2 upsampling, then
//! concatenation with the skip" (burn's composites — an expand/reshape upsampling, `cat`, and
//! flex's pooling — took about 0.25 s of a width-32 step at 240²: docs/cpu-notes.md).
//! Elsewhere (wgpu) [`crate::model::ops`] uses burn's operations, which these are tested against.

use burn::tensor::Tensor;
use burn_dispatch::backends::autodiff::checkpoint::base::Checkpointer;
use burn_dispatch::backends::autodiff::checkpoint::strategy::NoCheckpointing;
use burn_dispatch::backends::autodiff::grads::Gradients;
use burn_dispatch::backends::autodiff::ops::{Backward, Ops, OpsKind};
use burn_dispatch::backends::flex::FlexTensor;
use burn_dispatch::backends::{Autodiff, Flex};
use rayon::prelude::*;

use super::{FlexOperands, f32_values, flex, flex_operand, flex_operands};

/// 2×2, stride-2 max-pooling of `x` `[planes, h, w]` (h, w even): the maxima, and for each
/// the position of its value in the window (0 top-left, 1 top-right, 2 bottom-left, 3
/// bottom-right). Ties go to the first position in that order and NaN wins, as in PyTorch.
pub fn max_pool2(x: &[f32], planes: usize, h: usize, w: usize) -> (Vec<f32>, Vec<u8>) {
    let (ho, wo) = (h / 2, w / 2);
    let mut y = vec![0.0f32; planes * ho * wo];
    let mut idx = vec![0u8; planes * ho * wo];
    y.par_chunks_mut(wo)
        .zip(idx.par_chunks_mut(wo))
        .enumerate()
        .for_each(|(row, (yr, ir))| {
            let (p, r) = (row / ho, row % ho);
            let top = &x[(p * h + 2 * r) * w..][..w];
            let bottom = &x[(p * h + 2 * r + 1) * w..][..w];
            for j in 0..wo {
                let cand = [top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]];
                let (mut best, mut at) = (cand[0], 0u8);
                for (k, &v) in cand.iter().enumerate().skip(1) {
                    if v > best || (v.is_nan() && !best.is_nan()) {
                        best = v;
                        at = k as u8;
                    }
                }
                yr[j] = best;
                ir[j] = at;
            }
        });
    (y, idx)
}

/// Gradient of [`max_pool2`]: each output gradient goes to the position its maximum came from.
pub fn max_pool2_backward(dy: &[f32], idx: &[u8], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let wo = w / 2;
    let mut dx = vec![0.0f32; planes * h * w];
    dx.par_chunks_mut(2 * w)
        .enumerate()
        .for_each(|(row, pair)| {
            let (top, bottom) = pair.split_at_mut(w);
            let g = &dy[row * wo..][..wo];
            let ix = &idx[row * wo..][..wo];
            for j in 0..wo {
                match ix[j] {
                    0 => top[2 * j] = g[j],
                    1 => top[2 * j + 1] = g[j],
                    2 => bottom[2 * j] = g[j],
                    _ => bottom[2 * j + 1] = g[j],
                }
            }
        });
    dx
}

/// `cat([skip, nearest×2(low)], channels)` for `skip` `[b, c1, h, w]` and `low`
/// `[b, c2, h/2, w/2]` → `[b, c1 + c2, h, w]`.
pub fn upsample_cat(
    skip: &[f32],
    low: &[f32],
    (b, c1, c2, h, w): (usize, usize, usize, usize, usize),
) -> Vec<f32> {
    let (hw, wl) = (h * w, w / 2);
    let c = c1 + c2;
    let mut y = vec![0.0f32; b * c * hw];
    y.par_chunks_mut(hw).enumerate().for_each(|(plane, out)| {
        let (bi, ch) = (plane / c, plane % c);
        if ch < c1 {
            out.copy_from_slice(&skip[(bi * c1 + ch) * hw..][..hw]);
            return;
        }
        let src = &low[(bi * c2 + ch - c1) * (hw / 4)..][..hw / 4];
        for (r, row) in out.chunks_mut(w).enumerate() {
            let s = &src[(r / 2) * wl..][..wl];
            for (pair, &v) in row.chunks_exact_mut(2).zip(s) {
                pair[0] = v;
                pair[1] = v;
            }
        }
    });
    y
}

/// Gradient of [`upsample_cat`]: the skip's part, and for `low` the sum of each 2×2 block.
pub fn upsample_cat_backward(
    dy: &[f32],
    (b, c1, c2, h, w): (usize, usize, usize, usize, usize),
    want: (bool, bool),
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let (hw, wl) = (h * w, w / 2);
    let c = c1 + c2;
    let dskip = want.0.then(|| {
        let mut d = vec![0.0f32; b * c1 * hw];
        d.par_chunks_mut(hw).enumerate().for_each(|(plane, out)| {
            let (bi, ch) = (plane / c1, plane % c1);
            out.copy_from_slice(&dy[(bi * c + ch) * hw..][..hw]);
        });
        d
    });
    let dlow = want.1.then(|| {
        let mut d = vec![0.0f32; b * c2 * hw / 4];
        d.par_chunks_mut(hw / 4)
            .enumerate()
            .for_each(|(plane, out)| {
                let (bi, ch) = (plane / c2, plane % c2);
                let g = &dy[(bi * c + c1 + ch) * hw..][..hw];
                for (r, row) in out.chunks_mut(wl).enumerate() {
                    let (top, bottom) = (&g[2 * r * w..][..w], &g[(2 * r + 1) * w..][..w]);
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = (top[2 * j] + top[2 * j + 1]) + (bottom[2 * j] + bottom[2 * j + 1]);
                    }
                }
            });
        d
    });
    (dskip, dlow)
}

#[derive(Debug)]
struct MaxPoolBackward;

impl Backward<Flex, 1> for MaxPoolBackward {
    /// Input dims and the window positions of the maxima.
    type State = ([usize; 4], std::sync::Arc<Vec<u8>>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let ([b, c, h, w], idx) = ops.state;
        if let Some(node) = node_x {
            let dx = max_pool2_backward(&f32_values(&dy), &idx, b * c, h, w);
            grads.register::<Flex>(node.id, flex(dx, vec![b, c, h, w]));
        }
    }
}

/// 2×2, stride-2 max-pooling as one operation on the CPU backend: `Some` for f32 tensors on the
/// flex device with even height and width, `None` otherwise (the portable path).
pub fn max_pool2_cpu(x: &Tensor<4>) -> Option<Tensor<4>> {
    let [b, c, h, w] = x.dims();
    if h % 2 != 0 || w % 2 != 0 {
        return None;
    }
    let pool = |t: &FlexTensor| {
        let (y, idx) = max_pool2(&f32_values(t), b * c, h, w);
        (flex(y, vec![b, c, h / 2, w / 2]), idx)
    };
    match flex_operands([flex_operand(x)])? {
        FlexOperands::Autodiff([xa]) => {
            let out = match MaxPoolBackward
                .prepare::<NoCheckpointing>([xa.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let (y, idx) = pool(xa.primitive());
                    prep.finish(([b, c, h, w], std::sync::Arc::new(idx)), y)
                }
                OpsKind::UnTracked(prep) => prep.finish(pool(xa.primitive()).0),
            };
            Some(Tensor::from_primitive::<Autodiff<Flex>>(out))
        }
        FlexOperands::Plain([xp]) => Some(Tensor::from_primitive::<Flex>(pool(&xp).0)),
    }
}

#[derive(Debug)]
struct UpsampleCatBackward;

impl Backward<Flex, 2> for UpsampleCatBackward {
    /// (b, c1, c2, h, w).
    type State = (usize, usize, usize, usize, usize);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_s, node_l] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let d = ops.state;
        let (b, c1, c2, h, w) = d;
        let (ds, dl) =
            upsample_cat_backward(&f32_values(&dy), d, (node_s.is_some(), node_l.is_some()));
        if let (Some(node), Some(ds)) = (node_s, ds) {
            grads.register::<Flex>(node.id, flex(ds, vec![b, c1, h, w]));
        }
        if let (Some(node), Some(dl)) = (node_l, dl) {
            grads.register::<Flex>(node.id, flex(dl, vec![b, c2, h / 2, w / 2]));
        }
    }
}

/// `cat([skip, nearest×2(low)], 1)` as one operation on the CPU backend: `Some` for f32 tensors
/// on the flex device whose shapes fit, `None` otherwise (the portable path).
pub fn upsample_cat_cpu(skip: &Tensor<4>, low: &Tensor<4>) -> Option<Tensor<4>> {
    let [b, c1, h, w] = skip.dims();
    let [bl, c2, hl, wl] = low.dims();
    if b != bl || h != 2 * hl || w != 2 * wl {
        return None;
    }
    let d = (b, c1, c2, h, w);
    let run = |s: &FlexTensor, l: &FlexTensor| {
        flex(
            upsample_cat(&f32_values(s), &f32_values(l), d),
            vec![b, c1 + c2, h, w],
        )
    };
    match flex_operands([flex_operand(skip), flex_operand(low)])? {
        FlexOperands::Autodiff([s, l]) => {
            let out = match UpsampleCatBackward
                .prepare::<NoCheckpointing>([s.node(), l.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(d, run(s.primitive(), l.primitive())),
                OpsKind::UnTracked(prep) => prep.finish(run(s.primitive(), l.primitive())),
            };
            Some(Tensor::from_primitive::<Autodiff<Flex>>(out))
        }
        FlexOperands::Plain([s, l]) => Some(Tensor::from_primitive::<Flex>(run(&s, &l))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::upsample_nearest2;
    use burn::tensor::module::max_pool2d;
    use burn::tensor::ops::MaxPoolOptions;
    use burn::tensor::{Device, TensorData};

    fn values(n: usize, salt: usize) -> Vec<f32> {
        // Few distinct values, so pooling windows hold ties.
        (0..n)
            .map(|i| (((i * 7919 + salt * 104_729) % 13) as f32) - 6.0)
            .collect()
    }

    fn v4(t: Tensor<4>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// Values and gradients (of L = Σ y·g) equal burn's max_pool2d and its backward, exactly:
    /// both pick one maximum per window and copy values.
    #[test]
    fn max_pool_equals_burn() {
        let device = Device::flex().autodiff();
        let (b, c, h, w) = (2, 3, 6, 10);
        let xv = values(b * c * h * w, 1);
        let gv = values(b * c * h * w / 4, 2);
        let run = |ours: bool| {
            let x = Tensor::<4>::from_data(TensorData::new(xv.clone(), [b, c, h, w]), &device)
                .require_grad();
            let g =
                Tensor::<4>::from_data(TensorData::new(gv.clone(), [b, c, h / 2, w / 2]), &device);
            let y = if ours {
                max_pool2_cpu(&x).expect("the flex autodiff device takes the CPU path")
            } else {
                max_pool2d(x.clone(), MaxPoolOptions::new([2, 2]))
            };
            let grads = (y.clone() * g).sum().backward();
            (v4(y.without_autodiff()), v4(x.grad(&grads).unwrap()))
        };
        assert_eq!(run(true), run(false));
        // Ties: the first position in scan order wins, as in PyTorch's max_pool2d.
        let (_, idx) = max_pool2(&[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 0.0], 2, 2, 2);
        assert_eq!(idx, vec![0, 1]);
        let (y, _) = max_pool2(&[1.0, f32::NAN, 3.0, 0.0], 1, 2, 2);
        assert!(y[0].is_nan());
    }

    /// Values and gradients equal burn's `cat([skip, upsample_nearest2(low)], 1)` exactly (the
    /// low gradient sums four values, in another order than burn's reduction; the inputs are
    /// small integers, so every order gives the same sum).
    #[test]
    fn upsample_cat_equals_burn() {
        let device = Device::flex().autodiff();
        let (b, c1, c2, h, w) = (2, 3, 4, 6, 8);
        let sv = values(b * c1 * h * w, 3);
        let lv = values(b * c2 * h * w / 4, 4);
        let gv = values(b * (c1 + c2) * h * w, 5);
        let run = |ours: bool| {
            let s = Tensor::<4>::from_data(TensorData::new(sv.clone(), [b, c1, h, w]), &device)
                .require_grad();
            let l =
                Tensor::<4>::from_data(TensorData::new(lv.clone(), [b, c2, h / 2, w / 2]), &device)
                    .require_grad();
            let g =
                Tensor::<4>::from_data(TensorData::new(gv.clone(), [b, c1 + c2, h, w]), &device);
            let y = if ours {
                upsample_cat_cpu(&s, &l).expect("the flex autodiff device takes the CPU path")
            } else {
                Tensor::cat(vec![s.clone(), upsample_nearest2(l.clone())], 1)
            };
            let grads = (y.clone() * g).sum().backward();
            (
                v4(y.without_autodiff()),
                v4(s.grad(&grads).unwrap()),
                v4(l.grad(&grads).unwrap()),
            )
        };
        let (a, r) = (run(true), run(false));
        assert_eq!(a.0, r.0);
        assert_eq!(a.1, r.1);
        // Integer-valued inputs: the sums are exact in any order.
        assert_eq!(a.2, r.2);
    }
}
