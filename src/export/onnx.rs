//! `ctseg export --format onnx`: the trained U-Net as an ONNX model, for inference outside
//! ctseg (ONNX Runtime, TensorRT, MONAI Deploy).
//!
//! [`unet_to_onnx`] walks the architecture's stages ([`crate::model::arch`]) and takes the
//! weights from the peer's state dict ([`super::state_dict`]: same names, shapes and values), so
//! the model's output equals the PyTorch peer's eval-mode forward pass (and ctseg's own).
//!
//! # Graph
//!
//! - Input `ct`: float32 `[batch, in_channels, input_size, input_size]`; the batch is symbolic,
//!   height and width fixed to the trained size (the U-Net needs a multiple of 2^depth, and
//!   runtimes such as TensorRT build faster engines for fixed shapes). The input is what the
//!   network was trained on, after ctseg's intensity transform (raw HU, or a window mapped to
//!   [0, 1]); the metadata says which.
//! - Output `probabilities`: float32 `[batch, classes, input_size, input_size]`, a sigmoid per
//!   channel (channel 0 background, channel c ≥ 1 the probability that the label is ≥ c).
//! - Per block: BatchNormalization → Conv 3×3 (pads 1, bias) → Relu; MaxPool 2×2 stride 2 down;
//!   Resize ×2 up; Concat on axis 1, skip first; head Conv 1×1 → Sigmoid. Dropout is the
//!   identity at inference and does not appear.
//! - Resize: `mode = "nearest"`, `coordinate_transformation_mode = "asymmetric"`,
//!   `nearest_mode = "floor"`, scales `[1, 1, 2, 2]`, no roi: output pixel (y, x) reads input
//!   (⌊y/2⌋, ⌊x/2⌋), which is PyTorch's `interpolate(scale_factor=2, mode="nearest")`.
//! - Opset [`DEFAULT_OPSET`] (17) by default, any of [`MIN_OPSET`]..=[`MAX_OPSET`] on request;
//!   the IR version is the one released with that opset ([`ir_version`]: 8 for opset 17).
//!
//! # BatchNorm
//!
//! Each BatchNorm sits *before* its convolution, and the convolution zero-pads its normalised
//! input, so folding the normalisation into the following convolution's weights is wrong on the
//! border pixels; nor can it go into the previous convolution (a ReLU, max-pool or
//! concatenation stands between). So BatchNorm stays a per-channel affine map: by default a
//! `BatchNormalization` node in inference form over the state dict's γ, β and running statistics
//! (runtimes turn it into a scale and shift at load time); with
//! [`OnnxOptions::fold_batch_norm`], a `Mul` and an `Add` with `[1, C, 1, 1]` initializers
//! `{block}.bn.scale` = γ/√(σ² + ε) and `{block}.bn.shift` = β − μ·scale, computed in f64.
//!
//! # Encoding
//!
//! The protobuf is written by hand (varints and length-delimited fields) rather than through
//! prost and bindings generated from onnx.proto: the model is one fixed graph of fewer than a
//! dozen op types, so the writer needs a few dozen message fields and no decoder, and ctseg
//! gains no dependency or build-time code generation. Field numbers are onnx.proto's (protobuf
//! field numbers never change once released; each is named where it is written). Weights go
//! into `raw_data` as little-endian f32. One protobuf message is limited to 2 GiB, so a larger
//! model (width above about 264 at depth 4; the study's width 64 is 126 MB) is refused rather
//! than written with ONNX's external-data files.

use std::collections::{BTreeMap, BTreeSet};

use super::NamedTensor;
use crate::error::{Error, Result};
use crate::model::arch::Stage;

/// The name of the graph's input.
pub const INPUT_NAME: &str = "ct";
/// The name of the graph's output.
pub const OUTPUT_NAME: &str = "probabilities";
/// The opset written unless another is asked for.
pub const DEFAULT_OPSET: i64 = 17;
/// The oldest opset the graph can be written in (Resize's roi input became optional in 13).
pub const MIN_OPSET: i64 = 13;
/// The newest opset the graph is written and tested in.
pub const MAX_OPSET: i64 = 22;

/// What to record in the model besides the graph, and how to write BatchNorm.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxOptions {
    /// Input channels (1; 2k+1 with k context slices on each side).
    pub in_channels: usize,
    /// Height and width of the input.
    pub input_size: usize,
    /// BatchNorm's ε.
    pub bn_epsilon: f64,
    /// Write each BatchNorm as Mul + Add with precomputed scale and shift.
    pub fold_batch_norm: bool,
    /// `metadata_props`, in order (input size, intensity transform, steps...); unique keys.
    pub metadata: Vec<(String, String)>,
    /// `producer_version` (the producer name is "ctseg").
    pub producer_version: String,
    /// The ai.onnx opset, [`MIN_OPSET`]..=[`MAX_OPSET`].
    pub opset: i64,
}

fn bad(message: String) -> Error {
    Error::Argument(format!("onnx export: {message}"))
}

/// The IR version released together with an ai.onnx opset (the newest IR a runtime that knows
/// that opset is sure to read), or None outside [`MIN_OPSET`]..=[`MAX_OPSET`].
pub fn ir_version(opset: i64) -> Option<i64> {
    match opset {
        13 | 14 => Some(7),
        15..=18 => Some(8),
        19 | 20 => Some(9),
        21 | 22 => Some(10),
        _ => None,
    }
}

/// Builds the ONNX model of the U-Net whose forward pass is `stages` (from
/// [`crate::model::arch::stages`]) with the weights `tensors` (from [`super::state_dict`]), and
/// returns its bytes.
pub fn unet_to_onnx(stages: &[Stage], tensors: &[NamedTensor], o: &OnnxOptions) -> Result<Vec<u8>> {
    // 1. Options and tensors.
    let ir = ir_version(o.opset).ok_or_else(|| {
        bad(format!(
            "opset {} is not supported ({MIN_OPSET}..={MAX_OPSET})",
            o.opset
        ))
    })?;
    let mut keys = BTreeSet::new();
    for (k, _) in &o.metadata {
        if k.is_empty() || !keys.insert(k.as_str()) {
            return Err(bad(format!("metadata key `{k}` is empty or repeated")));
        }
    }
    let by_name: BTreeMap<&str, &NamedTensor> =
        tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let get = |name: &str| {
        by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::Invalid(format!("onnx export: the model has no `{name}`")))
    };
    // 2. The graph, stage by stage.
    let mut g = GraphBuilder::new();
    let mut x = INPUT_NAME.to_string();
    let mut skips: Vec<String> = Vec::new();
    let mut up = String::new();
    let mut classes = 0;
    for stage in stages {
        match stage {
            Stage::Block(b) => {
                let n = &b.peer;
                let normed = batch_norm(&mut g, &x, n, b.c_in, o, &get)?;
                let w = g.state_initializer(get(&format!("{n}.conv.weight"))?);
                let bias = g.state_initializer(get(&format!("{n}.conv.bias"))?);
                let c = g.node(
                    "Conv",
                    &format!("{n}/conv"),
                    &[&normed, &w, &bias],
                    &conv_attrs(3, 1),
                );
                x = g.node("Relu", &format!("{n}/relu"), &[&c], &[]);
            }
            Stage::Pool { level, .. } => {
                skips.push(x.clone());
                x = g.node(
                    "MaxPool",
                    &format!("enc.{level}/maxpool"),
                    &[&x],
                    &[
                        Attr::Ints("kernel_shape", vec![2, 2]),
                        Attr::Ints("strides", vec![2, 2]),
                        Attr::Ints("pads", vec![0, 0, 0, 0]),
                        Attr::Int("ceil_mode", 0),
                    ],
                );
            }
            Stage::Up {
                level,
                transposed: false,
                ..
            } => {
                if !g.has_initializer("upsample.scales") {
                    g.initializer("upsample.scales", &[4], &[1.0, 1.0, 2.0, 2.0]);
                }
                up = g.node(
                    "Resize",
                    &format!("dec.{level}/upsample"),
                    // No roi (only tf_crop_and_resize uses it), scales, no sizes.
                    &[&x, "", "upsample.scales"],
                    &[
                        Attr::Str("mode", "nearest"),
                        Attr::Str("coordinate_transformation_mode", "asymmetric"),
                        Attr::Str("nearest_mode", "floor"),
                    ],
                );
            }
            Stage::Up {
                transposed: true, ..
            } => {
                return Err(bad(
                    "transposed upsampling is not written (use model.upsampling = \"nearest\")"
                        .into(),
                ));
            }
            Stage::Concat { level, .. } => {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::Invalid("onnx export: a concat without a skip".into()))?;
                x = g.node(
                    "Concat",
                    &format!("dec.{level}/concat"),
                    &[&skip, &up],
                    &[Attr::Int("axis", 1)],
                );
            }
            Stage::Head { classes: c, .. } => {
                classes = *c;
                let hw = g.state_initializer(get("head.weight")?);
                let hb = g.state_initializer(get("head.bias")?);
                let logits = g.node("Conv", "head/conv", &[&x, &hw, &hb], &conv_attrs(1, 0));
                g.node_to("Sigmoid", "head/sigmoid", &[&logits], OUTPUT_NAME, &[]);
            }
        }
    }
    // 3. The model around it.
    let s = o.input_size as i64;
    let doc = format!(
        "livermask U-Net from ctseg (the PyTorch peer LivermaskUNet of livermask_torch.py). Input \
         `{INPUT_NAME}` [batch, {}, {s}, {s}] after ctseg's intensity transform (see metadata); \
         output `{OUTPUT_NAME}` [batch, {classes}, {s}, {s}], a sigmoid per channel: channel 0 \
         background, channel c >= 1 P(label >= c).",
        o.in_channels
    );
    let dims = |c: usize| {
        [
            Dim::Param("batch"),
            Dim::Value(c as i64),
            Dim::Value(s),
            Dim::Value(s),
        ]
    };
    let graph = g.finish(
        "livermask_unet",
        &doc,
        value_info(INPUT_NAME, &dims(o.in_channels)),
        value_info(OUTPUT_NAME, &dims(classes)),
    );
    // ModelProto, in field-number order.
    let mut m = Pb::with_capacity(graph.len() + 4096);
    m.int(1, ir); // ir_version
    m.string(2, "ctseg"); // producer_name
    m.string(3, &o.producer_version); // producer_version
    m.string(6, &doc); // doc_string
    m.bytes(7, &graph.0); // graph
    let mut opset = Pb::default();
    opset.string(1, ""); // OperatorSetIdProto.domain: "" = ai.onnx
    opset.int(2, o.opset); // OperatorSetIdProto.version
    m.message(8, &opset); // opset_import
    for (k, v) in &o.metadata {
        let mut e = Pb::default();
        e.string(1, k); // StringStringEntryProto.key
        e.string(2, v); // StringStringEntryProto.value
        m.message(14, &e); // metadata_props
    }
    if m.len() > i32::MAX as usize {
        return Err(bad(format!(
            "the model takes {} bytes, over protobuf's 2 GiB limit on one model",
            m.len()
        )));
    }
    Ok(m.0)
}

/// A k×k convolution's attributes (stride 1, padding `pad`).
fn conv_attrs(k: i64, pad: i64) -> Vec<Attr<'static>> {
    vec![
        Attr::Ints("kernel_shape", vec![k, k]),
        Attr::Ints("pads", vec![pad, pad, pad, pad]),
        Attr::Ints("strides", vec![1, 1]),
        Attr::Ints("dilations", vec![1, 1]),
        Attr::Int("group", 1),
    ]
}

/// Block `n`'s BatchNorm of `x` (`c` channels): a BatchNormalization node, or Mul + Add.
fn batch_norm<'a>(
    g: &mut GraphBuilder,
    x: &str,
    n: &str,
    c: usize,
    o: &OnnxOptions,
    get: &impl Fn(&str) -> Result<&'a NamedTensor>,
) -> Result<String> {
    let p = |k: &str| get(&format!("{n}.bn.{k}"));
    if o.fold_batch_norm {
        let (scale, shift) = folded_batch_norm(
            p("weight")?,
            p("bias")?,
            p("running_mean")?,
            p("running_var")?,
            o.bn_epsilon,
        );
        let shape = [1, c, 1, 1];
        g.initializer(&format!("{n}.bn.scale"), &shape, &scale);
        g.initializer(&format!("{n}.bn.shift"), &shape, &shift);
        let m = g.node(
            "Mul",
            &format!("{n}/bn_mul"),
            &[x, &format!("{n}.bn.scale")],
            &[],
        );
        return Ok(g.node(
            "Add",
            &format!("{n}/bn_add"),
            &[&m, &format!("{n}.bn.shift")],
            &[],
        ));
    }
    let mut inputs = Vec::new();
    for k in ["weight", "bias", "running_mean", "running_var"] {
        inputs.push(g.state_initializer(p(k)?));
    }
    Ok(g.node(
        "BatchNormalization",
        &format!("{n}/bn"),
        &[x, &inputs[0], &inputs[1], &inputs[2], &inputs[3]],
        // ONNX keeps ε as a float; PyTorch adds it to the f32 variance in f32 too.
        &[Attr::Float("epsilon", o.bn_epsilon as f32)],
    ))
}

/// BatchNorm as scale and shift, `[C]` each: scale = γ/√(σ² + ε), shift = β − μ·scale, in f64.
fn folded_batch_norm(
    gamma: &NamedTensor,
    beta: &NamedTensor,
    mean: &NamedTensor,
    var: &NamedTensor,
    eps: f64,
) -> (Vec<f32>, Vec<f32>) {
    let mut scale = Vec::with_capacity(gamma.values.len());
    let mut shift = Vec::with_capacity(gamma.values.len());
    for (((&g, &b), &m), &v) in gamma
        .values
        .iter()
        .zip(&beta.values)
        .zip(&mean.values)
        .zip(&var.values)
    {
        let s = f64::from(g) / (f64::from(v) + eps).sqrt();
        scale.push(s as f32);
        shift.push((f64::from(b) - f64::from(m) * s) as f32);
    }
    (scale, shift)
}

// ---------------------------------------------------------------------------------------------
// Graph building.

/// A node attribute.
enum Attr<'a> {
    Int(&'a str, i64),
    Ints(&'a str, Vec<i64>),
    Float(&'a str, f32),
    Str(&'a str, &'a str),
}

/// A tensor dimension: fixed or symbolic.
enum Dim<'a> {
    Value(i64),
    Param(&'a str),
}

/// GraphProto under construction: nodes and initializers as their encoded repeated fields.
struct GraphBuilder {
    nodes: Pb,
    initializers: Pb,
    names: BTreeSet<String>,
}

impl GraphBuilder {
    fn new() -> Self {
        GraphBuilder {
            nodes: Pb::default(),
            initializers: Pb::default(),
            names: BTreeSet::new(),
        }
    }

    fn has_initializer(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// Adds a float initializer.
    fn initializer(&mut self, name: &str, shape: &[usize], values: &[f32]) {
        self.names.insert(name.to_string());
        // TensorProto: dims = 1, data_type = 2, name = 8, raw_data = 9.
        let mut t = Pb::with_capacity(4 * values.len() + name.len() + 64);
        for &d in shape {
            t.int(1, d as i64);
        }
        t.int(2, DATA_TYPE_FLOAT);
        t.string(8, name);
        t.key(9, WIRE_LEN);
        t.varint((4 * values.len()) as u64);
        t.0.reserve(4 * values.len());
        for v in values {
            t.0.extend_from_slice(&v.to_le_bytes());
        }
        self.initializers.message(5, &t); // GraphProto.initializer
    }

    /// Adds a state-dict tensor as an initializer under its own name; returns the name.
    fn state_initializer(&mut self, t: &NamedTensor) -> String {
        self.initializer(&t.name, &t.shape, &t.values);
        t.name.clone()
    }

    /// Adds a node with one output named like the node; returns the output's name.
    fn node(&mut self, op: &str, name: &str, inputs: &[&str], attrs: &[Attr]) -> String {
        self.node_to(op, name, inputs, name, attrs);
        name.to_string()
    }

    /// Adds a node with one output `output`.
    fn node_to(&mut self, op: &str, name: &str, inputs: &[&str], output: &str, attrs: &[Attr]) {
        // NodeProto: input = 1, output = 2, name = 3, op_type = 4, attribute = 5.
        let mut n = Pb::default();
        for i in inputs {
            n.string(1, i);
        }
        n.string(2, output);
        n.string(3, name);
        n.string(4, op);
        for a in attrs {
            // AttributeProto: name = 1, f = 2, i = 3, s = 4, ints = 8, type = 20
            // (AttributeType FLOAT = 1, INT = 2, STRING = 3, INTS = 7).
            let mut p = Pb::default();
            match a {
                Attr::Float(k, v) => {
                    p.string(1, k);
                    p.float(2, *v);
                    p.int(20, 1);
                }
                Attr::Int(k, v) => {
                    p.string(1, k);
                    p.int(3, *v);
                    p.int(20, 2);
                }
                Attr::Str(k, v) => {
                    p.string(1, k);
                    p.string(4, v);
                    p.int(20, 3);
                }
                Attr::Ints(k, vs) => {
                    p.string(1, k);
                    for v in vs {
                        p.int(8, *v);
                    }
                    p.int(20, 7);
                }
            }
            n.message(5, &p);
        }
        self.nodes.message(1, &n); // GraphProto.node
    }

    /// The encoded GraphProto: node = 1, name = 2, initializer = 5, doc_string = 10,
    /// input = 11, output = 12.
    fn finish(self, name: &str, doc: &str, input: Pb, output: Pb) -> Pb {
        let mut g = Pb::with_capacity(self.nodes.len() + self.initializers.len() + 4096);
        g.0.extend_from_slice(&self.nodes.0);
        g.string(2, name);
        g.0.extend_from_slice(&self.initializers.0);
        g.string(10, doc);
        g.message(11, &input);
        g.message(12, &output);
        g
    }
}

/// ONNX's TensorProto.DataType FLOAT (and TypeProto.Tensor's elem_type).
const DATA_TYPE_FLOAT: i64 = 1;

/// A float tensor's ValueInfoProto.
fn value_info(name: &str, dims: &[Dim]) -> Pb {
    // TensorShapeProto.Dimension: dim_value = 1, dim_param = 2.
    let mut shape = Pb::default();
    for d in dims {
        let mut dim = Pb::default();
        match d {
            Dim::Value(v) => dim.int(1, *v),
            Dim::Param(p) => dim.string(2, p),
        }
        shape.message(1, &dim); // TensorShapeProto.dim
    }
    // TypeProto.Tensor: elem_type = 1, shape = 2.
    let mut tensor = Pb::default();
    tensor.int(1, DATA_TYPE_FLOAT);
    tensor.message(2, &shape);
    let mut ty = Pb::default();
    ty.message(1, &tensor); // TypeProto.tensor_type
    // ValueInfoProto: name = 1, type = 2.
    let mut v = Pb::default();
    v.string(1, name);
    v.message(2, &ty);
    v
}

// ---------------------------------------------------------------------------------------------
// Protobuf wire format: https://protobuf.dev/programming-guides/encoding/

const WIRE_VARINT: u8 = 0;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

/// An encoded protobuf message being written, field by field. Every field is written even when
/// it holds its default value (onnx.proto is proto2: presence matters to the checker).
#[derive(Default)]
struct Pb(Vec<u8>);

impl Pb {
    fn with_capacity(n: usize) -> Self {
        Pb(Vec::with_capacity(n))
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// Base-128 varint, low group first.
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint((u64::from(field) << 3) | u64::from(wire));
    }

    /// An int64 / int32 / enum field (negative values take ten bytes, as protobuf specifies).
    fn int(&mut self, field: u32, v: i64) {
        self.key(field, WIRE_VARINT);
        self.varint(v as u64);
    }

    fn float(&mut self, field: u32, v: f32) {
        self.key(field, WIRE_FIXED32);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, WIRE_LEN);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    fn string(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }

    fn message(&mut self, field: u32, m: &Pb) {
        self.bytes(field, &m.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Norm, UNetConfig, Upsampling};

    fn cfg(width: usize, depth: usize, size: usize) -> UNetConfig {
        UNetConfig {
            width,
            depth,
            input_size: size,
            classes: 3,
            upsampling: Upsampling::Nearest,
            dropout: 0.0,
            norm: Norm::Batch,
            bn_momentum: 0.99,
            bn_epsilon: 1e-3,
        }
    }

    /// A model's state dict with deterministic pseudo-random values.
    fn tensors(c: &UNetConfig) -> Vec<NamedTensor> {
        // Trainable tensors are told from BN statistics by require-grad: an autodiff device.
        let model = c.init(1, &burn::tensor::Device::flex().autodiff());
        crate::export::state_dict(&model, c).expect("state dict")
    }

    fn options() -> OnnxOptions {
        OnnxOptions {
            in_channels: 1,
            input_size: 32,
            bn_epsilon: 1e-3,
            fold_batch_norm: false,
            metadata: vec![("steps".into(), "10".into())],
            producer_version: "0.1.0".into(),
            opset: DEFAULT_OPSET,
        }
    }

    /// A decoded protobuf field: number and either a varint / fixed32 or the bytes.
    #[derive(Debug)]
    enum Field<'a> {
        Varint(u32, u64),
        Fixed32(u32, u32),
        Len(u32, &'a [u8]),
    }

    fn read_varint(b: &[u8], i: &mut usize) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let byte = b[*i];
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return v;
            }
            shift += 7;
        }
    }

    /// Splits a message into its fields (panics on malformed input: a test failure).
    fn fields(b: &[u8]) -> Vec<Field<'_>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let key = read_varint(b, &mut i);
            let field = (key >> 3) as u32;
            match (key & 7) as u8 {
                WIRE_VARINT => out.push(Field::Varint(field, read_varint(b, &mut i))),
                WIRE_FIXED32 => {
                    let v = u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
                    i += 4;
                    out.push(Field::Fixed32(field, v));
                }
                WIRE_LEN => {
                    let n = read_varint(b, &mut i) as usize;
                    out.push(Field::Len(field, &b[i..i + n]));
                    i += n;
                }
                w => panic!("unexpected wire type {w}"),
            }
        }
        assert_eq!(i, b.len(), "message overran");
        out
    }

    fn len_fields(b: &[u8], field: u32) -> Vec<&[u8]> {
        fields(b)
            .into_iter()
            .filter_map(|f| match f {
                Field::Len(n, v) if n == field => Some(v),
                _ => None,
            })
            .collect()
    }

    fn varint_field(b: &[u8], field: u32) -> Option<u64> {
        fields(b).into_iter().find_map(|f| match f {
            Field::Varint(n, v) if n == field => Some(v),
            _ => None,
        })
    }

    fn string_field(b: &[u8], field: u32) -> String {
        String::from_utf8(len_fields(b, field)[0].to_vec()).expect("utf-8")
    }

    #[test]
    fn varints_follow_the_wire_format() {
        // Protobuf's encoding guide: 300 → ac 02; −1 as int64 takes ten bytes; a string field 2
        // is key 0x12, a fixed32 field 2 is key 0x15 with the f32 bits little-endian.
        let enc = |v: i64| {
            let mut p = Pb::default();
            p.varint(v as u64);
            p.0
        };
        assert_eq!(enc(0), [0]);
        assert_eq!(enc(1), [1]);
        assert_eq!(enc(127), [0x7f]);
        assert_eq!(enc(128), [0x80, 0x01]);
        assert_eq!(enc(300), [0xac, 0x02]);
        assert_eq!(
            enc(-1),
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
        );
        let mut p = Pb::default();
        p.string(2, "ab");
        p.float(2, 1.0);
        assert_eq!(p.0, [0x12, 2, b'a', b'b', 0x15, 0, 0, 0x80, 0x3f]);
    }

    fn op_types(model: &[u8]) -> Vec<String> {
        let graph = len_fields(model, 7)[0];
        len_fields(graph, 1)
            .iter()
            .map(|n| string_field(n, 4))
            .collect()
    }

    #[test]
    fn the_graph_follows_the_architecture() {
        // Depth 2: 5 levels of 2 blocks (BN, Conv, Relu each), 2 pools, 2 upsamplings and
        // concatenations, the head's Conv and Sigmoid: 30 + 2 + 4 + 2 = 38 nodes.
        let c = cfg(4, 2, 32);
        let sd = tensors(&c);
        let model =
            unet_to_onnx(&crate::model::arch::stages(&c, 1), &sd, &options()).expect("onnx");
        assert_eq!(varint_field(&model, 1), Some(8), "ir_version of opset 17");
        let ops = op_types(&model);
        let count = |op: &str| ops.iter().filter(|o| *o == op).count();
        assert_eq!(
            [
                count("BatchNormalization"),
                count("Conv"),
                count("Relu"),
                count("MaxPool"),
                count("Resize"),
                count("Concat"),
                count("Sigmoid")
            ],
            [10, 11, 10, 2, 2, 2, 1]
        );
        assert_eq!(ops.len(), 38);
        // Every state-dict tensor is an initializer under its name, plus the Resize scales.
        let graph = len_fields(&model, 7)[0];
        assert_eq!(len_fields(graph, 5).len(), sd.len() + 1);
        let meta = len_fields(&model, 14);
        assert_eq!(string_field(meta[0], 1), "steps");
        // BatchNormalization's ε is a FLOAT attribute (field 2, fixed32) of type FLOAT (1).
        let nodes = len_fields(graph, 1);
        let bn = nodes
            .iter()
            .find(|n| string_field(n, 4) == "BatchNormalization")
            .expect("a BatchNormalization node");
        let eps = len_fields(bn, 5)[0];
        assert_eq!(string_field(eps, 1), "epsilon");
        let bits = fields(eps).into_iter().find_map(|f| match f {
            Field::Fixed32(2, v) => Some(v),
            _ => None,
        });
        assert_eq!(bits.map(f32::from_bits), Some(1e-3));
        assert_eq!(varint_field(eps, 20), Some(1));
    }

    #[test]
    fn folding_replaces_batch_norm_with_mul_add() {
        let c = cfg(2, 1, 8);
        let mut o = options();
        o.fold_batch_norm = true;
        o.opset = 13;
        let model =
            unet_to_onnx(&crate::model::arch::stages(&c, 1), &tensors(&c), &o).expect("onnx");
        assert_eq!(varint_field(&model, 1), Some(7), "ir_version of opset 13");
        let ops = op_types(&model);
        assert!(!ops.iter().any(|o| o == "BatchNormalization"));
        assert_eq!(ops[..4], ["Mul", "Add", "Conv", "Relu"]);
    }

    #[test]
    fn folded_batch_norm_is_the_formula() {
        // γ = 2, β = 1, μ = 3, σ² = 4 − ε: scale = 2/√4 = 1, shift = 1 − 3·1 = −2.
        let t = |v: f32| NamedTensor {
            name: String::new(),
            shape: vec![1],
            values: vec![v],
        };
        let (scale, shift) = folded_batch_norm(&t(2.0), &t(1.0), &t(3.0), &t(4.0 - 1e-3), 1e-3);
        assert!((scale[0] - 1.0).abs() < 1e-6 && (shift[0] + 2.0).abs() < 1e-6);
    }

    #[test]
    fn bad_options_are_refused() {
        let c = cfg(2, 1, 8);
        let stages = crate::model::arch::stages(&c, 1);
        let mut o = options();
        o.opset = 12;
        let e = unet_to_onnx(&stages, &tensors(&c), &o).expect_err("opset 12");
        assert!(e.to_string().contains("opset 12"), "{e}");
        let mut o = options();
        o.metadata.push(("steps".into(), "again".into()));
        let e = unet_to_onnx(&stages, &tensors(&c), &o).expect_err("repeated key");
        assert!(e.to_string().contains("`steps`"), "{e}");
    }
}
