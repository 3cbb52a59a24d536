//! `ctseg export`: a trained model for other tools. Its weights and BatchNorm statistics are
//! named as in the PyTorch peer model's state dict (`tests/reference/livermask_torch.py`), and
//! written as safetensors (so that `LivermaskUNet(width, levels=depth,
//! classes=classes).load_state_dict(...)` reproduces ctseg's outputs) or as an ONNX model
//! ([`onnx`]: ONNX Runtime, TensorRT, MONAI Deploy).

pub mod onnx;

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::RunConfig;
use crate::data::Intensity;
use crate::error::{Error, Result};
use crate::model::{Norm, UNet, UNetConfig, Upsampling};
use crate::train::flat::{self, Select};
use crate::util::fs::write_atomic;

/// One f32 tensor of the peer's state dict.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// State-dict name, e.g. `enc.0.1.conv.weight`.
    pub name: String,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub values: Vec<f32>,
}

/// Refuses configs the peer model cannot express.
pub fn check_exportable(run: &RunConfig) -> Result<()> {
    let cfg = &run.model;
    let mut problems = Vec::new();
    if run.data.context_slices > 0 {
        problems.push("data.context_slices must be 0 (the peer takes one input channel)");
    }
    if cfg.upsampling != Upsampling::Nearest {
        problems
            .push("model.upsampling must be \"nearest\" (the peer has no transposed upsampling)");
    }
    if cfg.norm != Norm::Batch {
        problems.push("model.norm must be \"batch\" (the peer always normalises)");
    }
    if (cfg.bn_epsilon - 1e-3).abs() > 1e-12 {
        problems.push("model.bn_epsilon must be 0.001 (the peer's BatchNorm eps)");
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Argument(format!(
            "export: this model has no PyTorch peer equivalent: {}",
            problems.join("; ")
        )))
    }
}

/// Refuses models the ONNX writer does not express (transposed upsampling, no normalisation).
pub fn check_onnx_exportable(run: &RunConfig) -> Result<()> {
    let cfg = &run.model;
    let mut problems = Vec::new();
    if cfg.upsampling != Upsampling::Nearest {
        problems.push("model.upsampling must be \"nearest\"");
    }
    if cfg.norm != Norm::Batch {
        problems.push("model.norm must be \"batch\"");
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Argument(format!(
            "export --format onnx: not written for this model: {}",
            problems.join("; ")
        )))
    }
}

/// Writes `model` as an ONNX model to `path` (atomically), with the input size, the intensity
/// transform, the training steps and the checkpoint's provenance in its metadata; the bytes
/// written.
pub fn export_onnx(
    model: &UNet,
    cfg: &RunConfig,
    steps: u64,
    fold_batch_norm: bool,
    path: &Path,
) -> Result<usize> {
    check_onnx_exportable(cfg)?;
    let in_channels = cfg.data.in_channels();
    let o = onnx::OnnxOptions {
        in_channels,
        input_size: cfg.model.input_size,
        bn_epsilon: cfg.model.bn_epsilon,
        fold_batch_norm,
        metadata: vec![
            ("input_size".into(), cfg.model.input_size.to_string()),
            ("intensity".into(), intensity_text(cfg)),
            ("steps".into(), steps.to_string()),
            (
                "outputs".into(),
                "sigmoid per channel: 0 background, c >= 1 P(label >= c); labels: 0 background, 1 liver, 2 tumour".into(),
            ),
        ],
        producer_version: env!("CARGO_PKG_VERSION").into(),
        opset: onnx::DEFAULT_OPSET,
    };
    let stages = crate::model::arch::stages(&cfg.model, in_channels);
    let bytes = onnx::unet_to_onnx(&stages, &state_dict(model, &cfg.model)?, &o)?;
    write_atomic(path, &bytes)?;
    Ok(bytes.len())
}

/// The peer's state dict of `model` (weights, biases, BN γ/β and running statistics; not the
/// batch counters, which only safetensors carries), in the peer's order. The names come from
/// the one architecture description ([`crate::model::arch`]); the shapes and values from the
/// model.
pub fn state_dict(model: &UNet, cfg: &UNetConfig) -> Result<Vec<NamedTensor>> {
    let trainable = flat::layout(model, Select::Trainable);
    let buffers = flat::layout(model, Select::Buffers);
    let tv = flat::flatten_values(model, Select::Trainable)?;
    let bv = flat::flatten_values(model, Select::Buffers)?;
    let stages = crate::model::arch::stages(cfg, 1);
    let blocks: Vec<&str> = crate::model::arch::blocks(&stages)
        .map(|b| b.peer.as_str())
        .collect();
    // Per block: γ, β, conv weight, conv bias (trainable); running mean, running var (buffers);
    // then the head's weight and bias.
    if trainable.len() != 4 * blocks.len() + 2 || buffers.len() != 2 * blocks.len() {
        return Err(Error::Invalid(format!(
            "export: the model has {} trainable and {} buffer tensors, expected {} and {} for depth {}",
            trainable.len(),
            buffers.len(),
            4 * blocks.len() + 2,
            2 * blocks.len(),
            cfg.depth
        )));
    }
    let (mut to, mut bo) = (0, 0);
    let take = |slots: &[flat::Slot], values: &[f32], o: &mut usize, k: usize| {
        let s = &slots[k];
        let v = values[*o..*o + s.len].to_vec();
        *o += s.len;
        (s.shape.clone(), v)
    };
    let mut out = Vec::new();
    let mut push = |name: String, (shape, values): (Vec<usize>, Vec<f32>)| {
        out.push(NamedTensor {
            name,
            shape,
            values,
        })
    };
    for (i, block) in blocks.iter().enumerate() {
        push(
            format!("{block}.bn.weight"),
            take(&trainable, &tv, &mut to, 4 * i),
        );
        push(
            format!("{block}.bn.bias"),
            take(&trainable, &tv, &mut to, 4 * i + 1),
        );
        push(
            format!("{block}.bn.running_mean"),
            take(&buffers, &bv, &mut bo, 2 * i),
        );
        push(
            format!("{block}.bn.running_var"),
            take(&buffers, &bv, &mut bo, 2 * i + 1),
        );
        push(
            format!("{block}.conv.weight"),
            take(&trainable, &tv, &mut to, 4 * i + 2),
        );
        push(
            format!("{block}.conv.bias"),
            take(&trainable, &tv, &mut to, 4 * i + 3),
        );
    }
    let k = 4 * blocks.len();
    push("head.weight".into(), take(&trainable, &tv, &mut to, k));
    push("head.bias".into(), take(&trainable, &tv, &mut to, k + 1));
    Ok(out)
}

/// The intensity transform the model's inputs need, in words (recorded in every export).
pub fn intensity_text(cfg: &RunConfig) -> String {
    match cfg.data.intensity {
        Intensity::Raw => "raw HU".to_string(),
        Intensity::Window => format!(
            "window [{}, {}] HU -> [0, 1]",
            cfg.data.window[0], cfg.data.window[1]
        ),
    }
}

/// Writes `model` as safetensors to `path` (atomically), with the config in the metadata;
/// the number of tensors written.
pub fn export_safetensors(model: &UNet, cfg: &RunConfig, steps: u64, path: &Path) -> Result<usize> {
    check_exportable(cfg)?;
    // (name, dtype, shape, bytes): the state dict, and after each block's running variance the
    // batch counter PyTorch's BatchNorm keeps.
    let mut entries: Vec<(String, &str, Vec<usize>, Vec<u8>)> = Vec::new();
    for t in state_dict(model, &cfg.model)? {
        let bytes = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let counter = t
            .name
            .strip_suffix(".running_var")
            .map(|bn| format!("{bn}.num_batches_tracked"));
        entries.push((t.name, "F32", t.shape, bytes));
        if let Some(name) = counter {
            entries.push((
                name,
                "I64",
                Vec::new(),
                (steps as i64).to_le_bytes().to_vec(),
            ));
        }
    }
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in &entries {
        let end = offset + bytes.len();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let meta: BTreeMap<&str, String> = BTreeMap::from([
        ("format", "pt".to_string()),
        ("producer", format!("ctseg {}", env!("CARGO_PKG_VERSION"))),
        (
            "peer",
            format!(
                "LivermaskUNet(width={}, levels={}, classes={}) from livermask_torch.py",
                cfg.model.width, cfg.model.depth, cfg.model.classes
            ),
        ),
        ("input_size", cfg.model.input_size.to_string()),
        ("intensity", intensity_text(cfg)),
        ("steps", steps.to_string()),
    ]);
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(meta).map_err(|e| Error::Invalid(e.to_string()))?,
    );
    let mut json = serde_json::to_vec(&header).map_err(|e| Error::Invalid(e.to_string()))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut bytes = Vec::with_capacity(8 + json.len() + offset);
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    for (_, _, _, b) in &entries {
        bytes.extend_from_slice(b);
    }
    write_atomic(path, &bytes)?;
    Ok(entries.len())
}
