//! livermask's 2-D U-Net (the PyTorch peer `tests/reference/livermask_torch.py` is the same
//! network), configurable in width, depth, upsampling, dropout and normalisation.
//!
//! Per level two blocks of BatchNorm → [SpatialDropout2D, decoder only] → Conv3×3 → ReLU; 2×2
//! max-pooling down; nearest ×2 upsampling (or a 2×2 transposed convolution); skip =
//! concat([encoder, upsampled]); 1×1 convolution to `classes` sigmoid channels. The stages
//! come from [`super::arch`]; the arithmetic from [`super::ops`].

use burn::module::Module;
use burn::tensor::Device;
use burn::tensor::Tensor;
use burn::tensor::activation::sigmoid;
use serde::{Deserialize, Serialize};

use super::arch::{self, Stage};
use super::layers::{BatchNorm, Block, Conv, Mode, ParamInit, UpConv};
use super::ops::{self, DeviceCaps};
use crate::error::{Error, Result};

/// How the decoder doubles the resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Upsampling {
    /// Nearest-neighbour ×2 (livermask's `UpSampling2D`): no parameters.
    Nearest,
    /// 2×2 transposed convolution with stride 2, keeping the channel count.
    Transposed,
}

/// Normalisation before each convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// Batch normalisation (livermask).
    Batch,
    /// None (used for exact data-parallel equivalence tests).
    None,
}

/// The `[model]` section of a run config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    /// Channels at the first level; level `i` has `width · 2^i` (livermask: 64).
    pub width: usize,
    /// Number of 2×2 max-pools (livermask: 4).
    pub depth: usize,
    /// Input height and width in pixels; must be divisible by `2^depth` (livermask: 240).
    pub input_size: usize,
    /// Output channels: 0 = background, c ≥ 1 = label ≥ c (livermask: 3 → bg, liver, tumour).
    pub classes: usize,
    /// `nearest` (livermask) or `transposed`.
    pub upsampling: Upsampling,
    /// SpatialDropout2D probability in the decoder blocks (livermask: 0.5).
    pub dropout: f64,
    /// `batch` (livermask) or `none`.
    pub norm: Norm,
    /// Fraction of BatchNorm running statistics kept per update (Keras `momentum`, 0.99).
    pub bn_momentum: f64,
    /// BatchNorm epsilon (Keras default 1e-3).
    pub bn_epsilon: f64,
}

/// The widest first level a config may ask for (livermask: 64); far above real use, and low
/// enough that an absurd width is refused instead of exhausting memory building the model.
pub const MAX_WIDTH: usize = 1024;
/// The largest input side (CT slices are 512 or 1024 pixels), for the same reason.
pub const MAX_INPUT_SIZE: usize = 8192;

impl UNetConfig {
    /// Checks the values; `source` names the config file for the message.
    pub fn validate(&self, source: &str) -> Result<()> {
        let bad = |field: &str, message: String| Error::ConfigValue {
            source_name: source.to_string(),
            field: format!("model.{field}"),
            message,
        };
        if !(1..=MAX_WIDTH).contains(&self.width) {
            return Err(bad(
                "width",
                format!("must be 1 to {MAX_WIDTH}, got {}", self.width),
            ));
        }
        if self.depth == 0 || self.depth > 8 {
            return Err(bad("depth", format!("must be 1..=8, got {}", self.depth)));
        }
        let f = 1usize << self.depth;
        if self.input_size == 0
            || self.input_size > MAX_INPUT_SIZE
            || !self.input_size.is_multiple_of(f)
        {
            return Err(bad(
                "input_size",
                format!(
                    "must be a positive multiple of 2^depth = {f} (depth {}) up to {MAX_INPUT_SIZE}, got {}",
                    self.depth, self.input_size
                ),
            ));
        }
        if self.classes < 2 {
            return Err(bad(
                "classes",
                format!("must be at least 2, got {}", self.classes),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(bad(
                "dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        if !(0.0..=1.0).contains(&self.bn_momentum) {
            return Err(bad(
                "bn_momentum",
                format!(
                    "must be in [0, 1] (Keras convention, 0.99), got {}",
                    self.bn_momentum
                ),
            ));
        }
        if !(self.bn_epsilon > 0.0 && self.bn_epsilon.is_finite()) {
            return Err(bad(
                "bn_epsilon",
                format!("must be positive, got {}", self.bn_epsilon),
            ));
        }
        Ok(())
    }

    /// Channel width of level `i`.
    pub fn level_width(&self, i: usize) -> usize {
        self.width << i
    }

    /// Builds the model with weights drawn from `seed` (one input channel).
    pub fn init(&self, seed: u64, device: &Device) -> UNet {
        self.init_with_inputs(seed, 1, device)
    }

    /// Builds the model for `in_channels` input channels with weights drawn from `seed`, stage
    /// by stage in the order of [`arch::stages`] (the same seed gives the same model on every
    /// backend).
    pub fn init_with_inputs(&self, seed: u64, in_channels: usize, device: &Device) -> UNet {
        let mut init = ParamInit::new(seed);
        let (mut encoder, mut up, mut decoder) = (Vec::new(), Vec::new(), Vec::new());
        let mut blocks = 0;
        let mut head = None;
        for stage in arch::stages(self, in_channels) {
            match stage {
                Stage::Block(b) => {
                    let norm = match self.norm {
                        Norm::Batch => Some(BatchNorm::new(
                            b.c_in,
                            self.bn_momentum,
                            self.bn_epsilon,
                            device,
                        )),
                        Norm::None => None,
                    };
                    let block = Block {
                        norm,
                        conv: Conv::new(b.c_in, b.c_out, 3, &mut init, device),
                        dropout: b.dropout,
                        index: blocks,
                    };
                    blocks += 1;
                    // Two blocks per level: a block opens a level when its index is even.
                    let levels: &mut Vec<Vec<Block>> = if b.path.starts_with("encoder") {
                        &mut encoder
                    } else {
                        &mut decoder
                    };
                    match levels.last_mut() {
                        Some(level) if level.len() < 2 => level.push(block),
                        _ => levels.push(vec![block]),
                    }
                }
                Stage::Up {
                    channels,
                    transposed: true,
                    ..
                } => up.push(UpConv::new(channels, channels, &mut init, device)),
                Stage::Head { c_in, classes, .. } => {
                    head = Some(Conv::new(c_in, classes, 1, &mut init, device));
                }
                Stage::Up { .. } | Stage::Pool { .. } | Stage::Concat { .. } => {}
            }
        }
        // `arch::stages` always ends with the head; the fallback is never built.
        let head =
            head.unwrap_or_else(|| Conv::new(self.width, self.classes, 1, &mut init, device));
        UNet {
            encoder,
            up,
            decoder,
            head,
            caps: DeviceCaps::default(),
        }
    }
}

/// The U-Net.
#[derive(Module, Debug)]
pub struct UNet {
    /// `depth + 1` levels of two blocks; the last is the bottleneck.
    pub encoder: Vec<Vec<Block>>,
    /// Transposed-convolution upsamplers, one per decoder level (empty for nearest).
    pub up: Vec<UpConv>,
    /// `depth` levels of two blocks, from the deepest to the finest.
    pub decoder: Vec<Vec<Block>>,
    /// 1×1 convolution to the class channels.
    pub head: Conv,
    /// What the operations must know about the device (not saved in checkpoints).
    #[module(skip)]
    pub caps: DeviceCaps,
}

impl UNet {
    /// Per-class probabilities.
    ///
    /// # Shapes
    /// - `x`: `[batch, 1, size, size]` → `[batch, classes, size, size]`
    pub fn forward(&self, x: Tensor<4>, mode: Mode) -> Tensor<4> {
        sigmoid(self.logits(x, mode))
    }

    /// Pre-sigmoid outputs, same shapes as [`forward`](Self::forward).
    pub fn logits(&self, x: Tensor<4>, mode: Mode) -> Tensor<4> {
        let caps = &self.caps;
        // 1. Encoder: two blocks per level, keep the output for the skip, pool.
        let mut skips = Vec::with_capacity(self.decoder.len());
        let mut x = x;
        let last = self.encoder.len() - 1;
        for (i, level) in self.encoder.iter().enumerate() {
            for block in level {
                x = block.forward(x, mode, caps);
            }
            if i < last {
                skips.push(x.clone());
                x = ops::max_pool2(x);
            }
        }
        // 2. Decoder: upsample, concat([skip, upsampled]), two blocks.
        for (i, level) in self.decoder.iter().enumerate() {
            let Some(skip) = skips.pop() else { break };
            x = match self.up.get(i) {
                Some(up) => Tensor::cat(vec![skip, up.forward(x, caps)], 1),
                None => ops::upsample_cat(skip, x),
            };
            for block in level {
                x = block.forward(x, mode, caps);
            }
        }
        // 3. Head.
        self.head.forward(x, false, caps)
    }

    /// This model for a device with `caps` (see [`crate::backend::Backend`]).
    pub fn with_caps(mut self, caps: DeviceCaps) -> Self {
        self.caps = caps;
        self
    }

    /// Trainable parameters (weights, biases, BN γ/β; not BN running statistics).
    pub fn num_trainable(&self) -> usize {
        struct Count(usize);
        impl burn::module::ModuleVisitor for Count {
            fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
                if param.is_require_grad() {
                    self.0 += param.shape().num_elements();
                }
            }
        }
        let mut c = Count(0);
        self.visit(&mut c);
        c.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use burn::tensor::TensorData;

    fn small(norm: Norm, keep: f64) -> UNetConfig {
        UNetConfig {
            width: 4,
            depth: 2,
            input_size: 32,
            classes: 3,
            upsampling: Upsampling::Nearest,
            dropout: 0.0,
            norm,
            bn_momentum: keep,
            bn_epsilon: 1e-3,
        }
    }

    fn input(b: usize, n: usize, device: &Device) -> Tensor<4> {
        let mut r = Rng::new(11);
        let v: Vec<f32> = (0..b * n * n)
            .map(|_| (50.0 + 30.0 * r.normal()) as f32)
            .collect();
        Tensor::from_data(TensorData::new(v, [b, 1, n, n]), device)
    }

    #[test]
    fn eval_with_fresh_running_stats_matches_train_forward() {
        // With momentum "keep" = 0 the running statistics become this batch's statistics, so an
        // evaluation forward must reproduce the training forward, up to the unbiased-variance
        // factor n/(n−1) of the running variance: at the bottleneck n = 4·16·16 = 1024, a 0.05 %
        // change of scale per layer; the sigmoid outputs move by less than 5e-3.
        let device = Device::flex().autodiff();
        let mut cfg = small(Norm::Batch, 0.0);
        cfg.input_size = 64;
        let model = cfg.init(3, &device);
        let x = input(4, 64, &device);
        let train = model.forward(
            x.clone(),
            Mode::Train {
                seed: 1,
                step: 0,
                stream: 0,
            },
        );
        let eval_model = model.valid();
        let eval = eval_model.forward(x.without_autodiff(), Mode::Eval);
        let a = crate::tensor_util::to_f32(train).unwrap_or_default();
        let b = crate::tensor_util::to_f32(eval).unwrap_or_default();
        assert_eq!(a.len(), b.len());
        let max = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(max < 5e-3, "max |train − eval| = {max}");
    }

    #[test]
    fn livermask_parameter_count() {
        // 31,391,493: livermask's Keras model.summary() and the PyTorch peer's
        // `sum(p.numel() for p in model.parameters())` at width 64.
        let cfg = UNetConfig {
            width: 64,
            depth: 4,
            input_size: 240,
            classes: 3,
            upsampling: Upsampling::Nearest,
            dropout: 0.5,
            norm: Norm::Batch,
            bn_momentum: 0.99,
            bn_epsilon: 1e-3,
        };
        assert_eq!(crate::model::summarize(&cfg).params(), 31_391_493);
        assert_eq!(crate::model::summarize(&cfg).buffers(), 13_570);
        let built = cfg.init(1, &Device::flex().autodiff());
        assert_eq!(built.num_trainable(), 31_391_493);
    }
}
