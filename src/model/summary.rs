//! `ctseg model`: the per-layer table, trainable parameter count and forward FLOPs of a U-Net
//! config, computed from the config alone (no tensors), and cross-checked against the built model
//! in tests.

use std::fmt::Write;

use super::unet::{Norm, UNetConfig, Upsampling};

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

/// Builds the table for `cfg`.
pub fn summarize(cfg: &UNetConfig) -> ModelSummary {
    let mut rows = Vec::new();
    let mut push =
        |name: String, kind: String, out: [usize; 3], params: usize, buffers: usize, flops: f64| {
            rows.push(LayerRow {
                name,
                kind,
                out_shape: out,
                params,
                buffers,
                flops,
            })
        };
    let block = |push: &mut dyn FnMut(String, String, [usize; 3], usize, usize, f64),
                 name: String,
                 c_in: usize,
                 c_out: usize,
                 hw: usize,
                 dropout: f64| {
        let px = (hw * hw) as f64;
        if cfg.norm == Norm::Batch {
            // normalise + scale + shift: ~4 FLOP per value
            push(
                format!("{name}.norm"),
                "BatchNorm".into(),
                [c_in, hw, hw],
                2 * c_in,
                2 * c_in,
                4.0 * c_in as f64 * px,
            );
        }
        if dropout > 0.0 {
            push(
                format!("{name}.dropout"),
                format!("SpatialDropout2D({dropout})"),
                [c_in, hw, hw],
                0,
                0,
                c_in as f64 * px,
            );
        }
        push(
            format!("{name}.conv"),
            "Conv3x3+ReLU".into(),
            [c_out, hw, hw],
            9 * c_in * c_out + c_out,
            0,
            2.0 * 9.0 * (c_in * c_out) as f64 * px + 2.0 * c_out as f64 * px,
        );
    };

    let mut c_in = 1;
    let mut hw = cfg.input_size;
    for i in 0..=cfg.depth {
        let w = cfg.level_width(i);
        block(&mut push, format!("encoder.{i}.0"), c_in, w, hw, 0.0);
        block(&mut push, format!("encoder.{i}.1"), w, w, hw, 0.0);
        c_in = w;
        if i < cfg.depth {
            hw /= 2;
            push(
                format!("encoder.{i}.pool"),
                "MaxPool2x2".into(),
                [w, hw, hw],
                0,
                0,
                (4 * w * hw * hw) as f64,
            );
        }
    }
    for (j, i) in (0..cfg.depth).rev().enumerate() {
        let w = cfg.level_width(i);
        hw *= 2;
        match cfg.upsampling {
            Upsampling::Nearest => push(
                format!("decoder.{j}.up"),
                "UpSampling2x (nearest)".into(),
                [c_in, hw, hw],
                0,
                0,
                0.0,
            ),
            Upsampling::Transposed => push(
                format!("up.{j}"),
                "ConvTranspose2x2/2".into(),
                [c_in, hw, hw],
                4 * c_in * c_in + c_in,
                0,
                2.0 * (c_in * c_in) as f64 * (hw * hw) as f64,
            ),
        }
        push(
            format!("decoder.{j}.concat"),
            "Concat(skip, up)".into(),
            [w + c_in, hw, hw],
            0,
            0,
            0.0,
        );
        block(
            &mut push,
            format!("decoder.{j}.0"),
            w + c_in,
            w,
            hw,
            cfg.dropout,
        );
        block(&mut push, format!("decoder.{j}.1"), w, w, hw, cfg.dropout);
        c_in = w;
    }
    let px = (hw * hw) as f64;
    push(
        "head".into(),
        "Conv1x1+Sigmoid".into(),
        [cfg.classes, hw, hw],
        c_in * cfg.classes + cfg.classes,
        0,
        2.0 * (c_in * cfg.classes) as f64 * px + 4.0 * cfg.classes as f64 * px,
    );
    ModelSummary { rows }
}
