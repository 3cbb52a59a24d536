//! `ctseg export`: a trained model's weights and BatchNorm statistics as a safetensors file
//! under the tensor names of the PyTorch peer model (`tests/reference/livermask_torch.py`), so
//! that `LivermaskUNet(width, levels=depth, classes=classes).load_state_dict(...)` reproduces
//! ctseg's outputs.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::{Norm, UNet, UNetConfig, Upsampling};
use crate::train::flat::{self, Select};
use crate::util::fs::write_atomic;

/// One tensor to write.
struct Entry {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Refuses configs the peer model cannot express.
pub fn check_exportable(cfg: &UNetConfig) -> Result<()> {
    let mut problems = Vec::new();
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

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The peer's state dict for `model`: names, shapes and values. `steps` fills BatchNorm's
/// `num_batches_tracked`.
fn state_dict(model: &UNet, cfg: &UNetConfig, steps: u64) -> Result<Vec<Entry>> {
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
    let mut to = 0;
    let mut bo = 0;
    let take = |slots: &[flat::Slot], values: &[f32], o: &mut usize, k: usize| {
        let s = &slots[k];
        let v = &values[*o..*o + s.len];
        *o += s.len;
        (s.shape.clone(), f32_bytes(v))
    };
    let mut out = Vec::new();
    for (i, block) in blocks.iter().enumerate() {
        let mut push =
            |suffix: &str, dtype: &'static str, (shape, bytes): (Vec<usize>, Vec<u8>)| {
                out.push(Entry {
                    name: format!("{block}.{suffix}"),
                    dtype,
                    shape,
                    bytes,
                })
            };
        push("bn.weight", "F32", take(&trainable, &tv, &mut to, 4 * i));
        push("bn.bias", "F32", take(&trainable, &tv, &mut to, 4 * i + 1));
        push(
            "bn.running_mean",
            "F32",
            take(&buffers, &bv, &mut bo, 2 * i),
        );
        push(
            "bn.running_var",
            "F32",
            take(&buffers, &bv, &mut bo, 2 * i + 1),
        );
        push(
            "bn.num_batches_tracked",
            "I64",
            (Vec::new(), (steps as i64).to_le_bytes().to_vec()),
        );
        push(
            "conv.weight",
            "F32",
            take(&trainable, &tv, &mut to, 4 * i + 2),
        );
        push(
            "conv.bias",
            "F32",
            take(&trainable, &tv, &mut to, 4 * i + 3),
        );
    }
    let k = 4 * blocks.len();
    let (shape, bytes) = take(&trainable, &tv, &mut to, k);
    out.push(Entry {
        name: "head.weight".into(),
        dtype: "F32",
        shape,
        bytes,
    });
    let (shape, bytes) = take(&trainable, &tv, &mut to, k + 1);
    out.push(Entry {
        name: "head.bias".into(),
        dtype: "F32",
        shape,
        bytes,
    });
    Ok(out)
}

/// Writes `model` as safetensors to `path` (atomically), with the config in the metadata.
pub fn export_safetensors(
    model: &UNet,
    cfg: &crate::config::RunConfig,
    steps: u64,
    path: &Path,
) -> Result<usize> {
    check_exportable(&cfg.model)?;
    let entries = state_dict(model, &cfg.model, steps)?;
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for e in &entries {
        let end = offset + e.bytes.len();
        header.insert(
            e.name.clone(),
            serde_json::json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, end]}),
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
        (
            "intensity",
            match cfg.data.intensity {
                crate::data::Intensity::Raw => "raw HU".to_string(),
                crate::data::Intensity::Window => format!(
                    "window [{}, {}] HU -> [0, 1]",
                    cfg.data.window[0], cfg.data.window[1]
                ),
            },
        ),
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
    for e in &entries {
        bytes.extend_from_slice(&e.bytes);
    }
    write_atomic(path, &bytes)?;
    Ok(entries.len())
}
