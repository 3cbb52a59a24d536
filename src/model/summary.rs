//! `ctseg model`: the per-layer table, trainable parameter count and forward FLOPs of a U-Net
//! config, computed from the config alone (no tensors), and cross-checked against the built model
//! in tests.

use std::fmt::Write;

use super::arch::{self, Stage};
use super::unet::{Norm, UNetConfig};

/// One row of the layer table.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerRow {
    /// Dotted name, e.g. `encoder.0.1.conv` (same path as the module tree).
    pub name: String,
    /// What the layer is.
    pub kind: String,
    /// Output shape per image: `[channels, h, w]`.
    pub out_shape: [usize; 3],
    /// Trainable parameters.
    pub params: usize,
    /// Non-trainable state (BN running mean and variance).
    pub buffers: usize,
    /// Forward floating-point operations per image (a multiply-add counts 2).
    pub flops: f64,
}

/// The whole table.
#[derive(Clone, Debug)]
pub struct ModelSummary {
    /// Rows in forward order.
    pub rows: Vec<LayerRow>,
}

impl ModelSummary {
    /// Trainable parameters.
    pub fn params(&self) -> usize {
        self.rows.iter().map(|r| r.params).sum()
    }

    /// Non-trainable buffers.
    pub fn buffers(&self) -> usize {
        self.rows.iter().map(|r| r.buffers).sum()
    }

    /// Forward FLOPs per image.
    pub fn flops(&self) -> f64 {
        self.rows.iter().map(|r| r.flops).sum()
    }

    /// FLOPs of one trained image: forward + backward (≈ 2× forward: input and weight gradients).
    pub fn train_flops(&self) -> f64 {
        3.0 * self.flops()
    }

    /// Renders the table as text.
    pub fn render(&self, cfg: &UNetConfig) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "U-Net width {} depth {} input {}x{} classes {} upsampling {:?} norm {:?} dropout {}",
            cfg.width,
            cfg.depth,
            cfg.input_size,
            cfg.input_size,
            cfg.classes,
            cfg.upsampling,
            cfg.norm,
            cfg.dropout
        );
        let _ = writeln!(
            s,
            "{:<24} {:<26} {:>18} {:>12} {:>10}",
            "layer", "kind", "output (c,h,w)", "params", "MFLOP"
        );
        for r in &self.rows {
            let shape = format!("{}x{}x{}", r.out_shape[0], r.out_shape[1], r.out_shape[2]);
            let _ = writeln!(
                s,
                "{:<24} {:<26} {:>18} {:>12} {:>10.1}",
                r.name,
                r.kind,
                shape,
                r.params,
                r.flops / 1e6
            );
        }
        let _ = writeln!(s, "trainable parameters: {}", self.params());
        let _ = writeln!(
            s,
            "non-trainable buffers (BN running statistics): {}",
            self.buffers()
        );
        let _ = writeln!(s, "forward GFLOP per image: {:.2}", self.flops() / 1e9);
        let _ = writeln!(
            s,
            "trained GFLOP per image (forward + backward, ~3x forward): {:.1}",
            self.train_flops() / 1e9
        );
        s
    }
}

/// Builds the table for `cfg` with one input channel.
pub fn summarize(cfg: &UNetConfig) -> ModelSummary {
    summarize_with_inputs(cfg, 1)
}

/// Builds the table for `cfg` with `in_channels` input channels, from [`arch::stages`].
pub fn summarize_with_inputs(cfg: &UNetConfig, in_channels: usize) -> ModelSummary {
    let mut rows = Vec::new();
    let mut push = |name: String, kind: String, out: [usize; 3], params, buffers, flops| {
        rows.push(LayerRow {
            name,
            kind,
            out_shape: out,
            params,
            buffers,
            flops,
        })
    };
    for stage in arch::stages(cfg, in_channels) {
        match stage {
            Stage::Block(b) => {
                let px = (b.side * b.side) as f64;
                let (c_in, c_out, side) = (b.c_in, b.c_out, b.side);
                if cfg.norm == Norm::Batch {
                    // normalise + scale + shift: ~4 FLOP per value
                    push(
                        format!("{}.norm", b.path),
                        "BatchNorm".into(),
                        [c_in, side, side],
                        2 * c_in,
                        2 * c_in,
                        4.0 * c_in as f64 * px,
                    );
                }
                if b.dropout > 0.0 {
                    push(
                        format!("{}.dropout", b.path),
                        format!("SpatialDropout2D({})", b.dropout),
                        [c_in, side, side],
                        0,
                        0,
                        c_in as f64 * px,
                    );
                }
                push(
                    format!("{}.conv", b.path),
                    "Conv3x3+ReLU".into(),
                    [c_out, side, side],
                    9 * c_in * c_out + c_out,
                    0,
                    2.0 * 9.0 * (c_in * c_out) as f64 * px + 2.0 * c_out as f64 * px,
                );
            }
            Stage::Pool {
                level,
                channels,
                side_out,
            } => push(
                format!("encoder.{level}.pool"),
                "MaxPool2x2".into(),
                [channels, side_out, side_out],
                0,
                0,
                (4 * channels * side_out * side_out) as f64,
            ),
            Stage::Up {
                level,
                channels,
                side_out,
                transposed: false,
            } => push(
                format!("decoder.{level}.up"),
                "UpSampling2x (nearest)".into(),
                [channels, side_out, side_out],
                0,
                0,
                0.0,
            ),
            Stage::Up {
                level,
                channels,
                side_out,
                transposed: true,
            } => push(
                format!("up.{level}"),
                "ConvTranspose2x2/2".into(),
                [channels, side_out, side_out],
                4 * channels * channels + channels,
                0,
                2.0 * (channels * channels) as f64 * (side_out * side_out) as f64,
            ),
            Stage::Concat {
                level,
                channels,
                side,
            } => push(
                format!("decoder.{level}.concat"),
                "Concat(skip, up)".into(),
                [channels, side, side],
                0,
                0,
                0.0,
            ),
            Stage::Head {
                c_in,
                classes,
                side,
            } => {
                let px = (side * side) as f64;
                push(
                    "head".into(),
                    "Conv1x1+Sigmoid".into(),
                    [classes, side, side],
                    c_in * classes + classes,
                    0,
                    2.0 * (c_in * classes) as f64 * px + 4.0 * classes as f64 * px,
                );
            }
        }
    }
    ModelSummary { rows }
}
