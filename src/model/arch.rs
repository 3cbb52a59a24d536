//! The one description of livermask's U-Net architecture: the stages of a config in forward
//! order with their channels and sizes. Building the model ([`super::unet`]), the layer table
//! ([`super::summary`]) and the exported tensor names ([`crate::export`]) all walk it, so the
//! architecture is written once.

use super::unet::{UNetConfig, Upsampling};

/// A BatchNorm → [SpatialDropout2D] → Conv3×3 → ReLU block.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockSpec {
    /// Module path, e.g. `encoder.0.1` (the model's field names).
    pub path: String,
    /// The PyTorch peer's name, e.g. `enc.0.1` (`tests/reference/livermask_torch.py`).
    pub peer: String,
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Side length of its square feature maps.
    pub side: usize,
    /// Spatial dropout probability (decoder blocks only).
    pub dropout: f64,
}

/// One stage of the forward pass.
#[derive(Clone, Debug, PartialEq)]
pub enum Stage {
    /// A block.
    Block(BlockSpec),
    /// 2×2 max-pooling after encoder level `level` (`channels` maps of `side_out`²).
    Pool {
        /// Encoder level.
        level: usize,
        /// Channels.
        channels: usize,
        /// Side length after pooling.
        side_out: usize,
    },
    /// ×2 upsampling before decoder level `level` (0 = the deepest).
    Up {
        /// Decoder level.
        level: usize,
        /// Channels.
        channels: usize,
        /// Side length after upsampling.
        side_out: usize,
        /// A 2×2 transposed convolution (`true`) or nearest-neighbour (`false`).
        transposed: bool,
    },
    /// `cat([skip, upsampled])` before decoder level `level`.
    Concat {
        /// Decoder level.
        level: usize,
        /// Channels after concatenation.
        channels: usize,
        /// Side length.
        side: usize,
    },
    /// The 1×1 convolution to the class channels, then the sigmoid.
    Head {
        /// Input channels.
        c_in: usize,
        /// Output channels (classes).
        classes: usize,
        /// Side length.
        side: usize,
    },
}

/// The stages of `cfg`'s U-Net in forward order, for `in_channels` input channels.
pub fn stages(cfg: &UNetConfig, in_channels: usize) -> Vec<Stage> {
    let mut out = Vec::new();
    let block = |path: String, peer: String, c_in, c_out, side, dropout| {
        Stage::Block(BlockSpec {
            path,
            peer,
            c_in,
            c_out,
            side,
            dropout,
        })
    };
    // 1. Encoder: two blocks per level, then a pool (except after the bottleneck).
    let (mut c_in, mut side) = (in_channels, cfg.input_size);
    for i in 0..=cfg.depth {
        let w = cfg.level_width(i);
        for b in 0..2 {
            let from = if b == 0 { c_in } else { w };
            out.push(block(
                format!("encoder.{i}.{b}"),
                format!("enc.{i}.{b}"),
                from,
                w,
                side,
                0.0,
            ));
        }
        c_in = w;
        if i < cfg.depth {
            side /= 2;
            out.push(Stage::Pool {
                level: i,
                channels: w,
                side_out: side,
            });
        }
    }
    // 2. Decoder: upsample, concat([skip, upsampled]), two blocks per level.
    for (j, i) in (0..cfg.depth).rev().enumerate() {
        let w = cfg.level_width(i);
        side *= 2;
        out.push(Stage::Up {
            level: j,
            channels: c_in,
            side_out: side,
            transposed: cfg.upsampling == Upsampling::Transposed,
        });
        out.push(Stage::Concat {
            level: j,
            channels: w + c_in,
            side,
        });
        for b in 0..2 {
            let from = if b == 0 { w + c_in } else { w };
            out.push(block(
                format!("decoder.{j}.{b}"),
                format!("dec.{j}.{b}"),
                from,
                w,
                side,
                cfg.dropout,
            ));
        }
        c_in = w;
    }
    // 3. Head.
    out.push(Stage::Head {
        c_in,
        classes: cfg.classes,
        side,
    });
    out
}

/// The blocks of `stages`, in forward order (which is also the model's module-visit order).
pub fn blocks(stages: &[Stage]) -> impl Iterator<Item = &BlockSpec> {
    stages.iter().filter_map(|s| match s {
        Stage::Block(b) => Some(b),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::unet::Norm;

    #[test]
    fn depth_one_stages_in_order() {
        let cfg = UNetConfig {
            width: 4,
            depth: 1,
            input_size: 16,
            classes: 3,
            upsampling: Upsampling::Nearest,
            dropout: 0.5,
            norm: Norm::Batch,
            bn_momentum: 0.9,
            bn_epsilon: 1e-3,
        };
        let s = stages(&cfg, 1);
        let names: Vec<&str> = blocks(&s).map(|b| b.peer.as_str()).collect();
        assert_eq!(
            names,
            [
                "enc.0.0", "enc.0.1", "enc.1.0", "enc.1.1", "dec.0.0", "dec.0.1"
            ]
        );
        let chans: Vec<(usize, usize, usize)> =
            blocks(&s).map(|b| (b.c_in, b.c_out, b.side)).collect();
        // Level 0: 1 → 4 → 4 at 16²; bottleneck 4 → 8 → 8 at 8²; decoder: cat(4, 8) = 12 → 4.
        assert_eq!(
            chans,
            [
                (1, 4, 16),
                (4, 4, 16),
                (4, 8, 8),
                (8, 8, 8),
                (12, 4, 16),
                (4, 4, 16)
            ]
        );
        assert_eq!(
            s.last(),
            Some(&Stage::Head {
                c_in: 4,
                classes: 3,
                side: 16
            })
        );
    }
}
