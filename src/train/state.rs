//! What training changes, as one value: the model (weights and BN statistics), the optimiser
//! state and, in mixed precision, the loss scale, with the one serialisation that checkpoints,
//! resume and the start-up broadcast from rank 0 all use.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Device};

use crate::comm::Communicator;
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::model::{DeviceCaps, UNet};
use crate::rundir::{Checkpoint, CheckpointKind};
use crate::train::scaler::LossScale;

/// The model, its optimiser and the loss scale.
pub struct TrainState {
    /// The model, on the training (autodiff) device.
    pub model: UNet,
    /// The optimiser and its per-parameter state.
    pub optim: ModuleOptimizer,
    /// Dynamic loss scaling, in mixed precision only (the model's `caps.f16_operands`).
    pub loss_scale: Option<LossScale>,
}

fn record_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{what}: {e}"))
}

/// Builds the model of `cfg` (its input channels from `data.context_slices`) on `device` (with
/// `caps`) with its initial weights.
pub fn build_model(cfg: &RunConfig, device: &Device, caps: DeviceCaps) -> UNet {
    cfg.model
        .init_with_inputs(cfg.seed, cfg.data.in_channels(), device)
        .with_caps(caps)
}

/// The model's weights and BN statistics as bytes (a burnpack record).
pub fn model_bytes(model: &UNet) -> Result<Vec<u8>> {
    let bytes = model
        .clone()
        .into_record()
        .into_bytes()
        .map_err(|e| record_error("serialising the model", e))?;
    Ok(bytes.to_vec())
}

/// `model` with the weights and BN statistics of `bytes` (read from `source`, named in errors).
pub fn load_model(model: UNet, bytes: Vec<u8>, source: &Path) -> Result<UNet> {
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes))
        .map_err(|e| Error::checkpoint(source, format!("model record: {e}")))?;
    model
        .try_load_record(record)
        .map_err(|e| Error::checkpoint(source, format!("model does not match the config: {e}")))
}

/// Refuses an optimiser record that burn's loader would panic on rather than return an error
/// (burn-optim 0.22.1's `ModuleOptimizer::load_record`): a state tensor without the id of its
/// parameter, a parameter rank (its `{id}.__rank` scalar, else its first tensor's rank) outside
/// the 0–8 its loader dispatches on, a state tensor whose rank differs from its parameter's
/// (built as a tensor of the parameter's rank), or a shape that does not describe the tensor's
/// bytes. Each was found by the fuzz suite (tests/fuzz.rs).
fn check_optimizer_record(bytes: &[u8], source: &Path) -> Result<()> {
    use burn_pack::Reader;
    use std::collections::BTreeMap;
    const MAX_RANK: usize = 8;
    let bad = |m: String| Error::checkpoint(source, format!("optimiser record: {m}"));
    let reader = Reader::from_bytes(Bytes::from_bytes_vec(bytes.to_vec()))
        .map_err(|e| bad(e.to_string()))?;
    // 1. The ranks the record states, as burn reads them.
    let mut ranks: BTreeMap<u64, usize> = BTreeMap::new();
    for (name, value) in reader.scalars() {
        let Some(id) = name.strip_suffix(".__rank") else {
            continue;
        };
        if let (Ok(id), Ok(rank)) = (id.parse::<u64>(), usize::try_from(*value)) {
            ranks.insert(id, rank);
        }
    }
    // 2. Every tensor: a parameter id, a rank its parameter has, a shape its bytes hold.
    for t in reader.into_tensors().map_err(|e| bad(e.to_string()))? {
        let (name, dtype, shape, id, data) = t.into_parts().map_err(|e| bad(e.to_string()))?;
        let Some(id) = id else {
            return Err(bad(format!(
                "state tensor {name:?} names no parameter; the record is corrupt"
            )));
        };
        let dims = shape.as_slice();
        let rank = *ranks.entry(id).or_insert(dims.len());
        if rank != dims.len() {
            return Err(bad(format!(
                "state tensor {name:?} has rank {}, its parameter {id} rank {rank}; the record is corrupt",
                dims.len()
            )));
        }
        let bytes = dims.iter().try_fold(dtype.size(), |n, &d| n.checked_mul(d));
        if bytes != Some(data.len()) {
            return Err(bad(format!(
                "state tensor {name:?} of shape {dims:?} holds {} bytes; the record is corrupt",
                data.len()
            )));
        }
    }
    if let Some((id, rank)) = ranks.iter().find(|(_, r)| **r > MAX_RANK) {
        return Err(bad(format!(
            "parameter {id} has rank {rank}, beyond the {MAX_RANK} optimiser states support; the record is corrupt"
        )));
    }
    Ok(())
}

impl TrainState {
    /// The initial model of `cfg` and a fresh optimiser (and loss scale, where `caps` ask for
    /// mixed precision).
    pub fn fresh(cfg: &RunConfig, device: &Device, caps: DeviceCaps) -> Self {
        Self {
            model: build_model(cfg, device, caps),
            optim: cfg.optimizer.init(),
            loss_scale: caps.f16_operands.then(LossScale::default),
        }
    }

    /// The state serialised as (model bytes, optimiser bytes).
    pub fn to_bytes(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        let optim = self
            .optim
            .into_bytes()
            .map_err(|e| record_error("serialising the optimiser", e))?
            .to_vec();
        Ok((model_bytes(&self.model)?, optim))
    }

    /// This state with the model and optimiser of `bytes` (read from `source`).
    pub fn load_bytes(
        self,
        cfg: &RunConfig,
        (model, optim): (Vec<u8>, Vec<u8>),
        source: &Path,
    ) -> Result<Self> {
        check_optimizer_record(&optim, source)?;
        let model = load_model(self.model, model, source)?;
        let optim = cfg
            .optimizer
            .init()
            .from_bytes(Bytes::from_bytes_vec(optim))
            .map_err(|e| Error::checkpoint(source, format!("optimiser record: {e}")))?;
        Ok(Self {
            model,
            optim,
            loss_scale: self.loss_scale,
        })
    }

    /// Makes every rank hold rank 0's state (weights, BN statistics, optimiser state and its
    /// parameter ids) by broadcasting rank 0's serialised records. Collective.
    pub fn broadcast_from_root(self, cfg: &RunConfig, comm: &dyn Communicator) -> Result<Self> {
        if comm.size() == 1 {
            return Ok(self);
        }
        let (mut m, mut o) = if comm.rank() == 0 {
            self.to_bytes()?
        } else {
            (Vec::new(), Vec::new())
        };
        comm.broadcast_bytes(&mut m, 0)?;
        comm.broadcast_bytes(&mut o, 0)?;
        let mut scale = serde_json::to_vec(&self.loss_scale)
            .map_err(|e| record_error("serialising the loss scale", e))?;
        comm.broadcast_bytes(&mut scale, 0)?;
        let loss_scale = serde_json::from_slice(&scale)
            .map_err(|e| record_error("the loss scale broadcast from rank 0", e))?;
        let state = Self { loss_scale, ..self };
        state.load_bytes(cfg, (m, o), Path::new("<broadcast from rank 0>"))
    }
}

/// Refuses a checkpoint whose config describes a model its weights cannot be: the model is
/// built from the config before the weights are loaded into it, so a corrupt width (65,536 asks
/// for terabytes) would be allocated first. The bottleneck's second convolution alone holds
/// (width · 2^depth)² · 9 weights and the head width · classes, at two bytes or more each.
pub fn check_model_fits(cfg: &RunConfig, record: &[u8], file: &Path) -> Result<()> {
    let m = &cfg.model;
    m.validate(&file.display().to_string())
        .map_err(|e| Error::checkpoint(file, format!("its run config: {e}")))?;
    let widest = m.width as f64 * 2f64.powi(m.depth as i32);
    let least = 2.0 * (9.0 * widest * widest + m.width as f64 * m.classes as f64);
    if least > record.len() as f64 {
        return Err(Error::checkpoint(
            file,
            format!(
                "its run config describes a U-Net of width {} and depth {} with {} classes ({least:.0} bytes of weights at the least), but the model record holds {} bytes: the checkpoint is corrupt",
                m.width,
                m.depth,
                m.classes,
                record.len()
            ),
        ));
    }
    Ok(())
}

/// A trained run a command was pointed at: the checkpoint it asked for, the file it came from,
/// and the run config stored in it.
pub struct Trained {
    /// The checkpoint.
    pub ck: Checkpoint,
    /// The file it was read from.
    pub file: PathBuf,
    /// Its run config.
    pub cfg: RunConfig,
    /// Set when `best` was asked for but the run has no best checkpoint yet (the last is used).
    pub note: Option<String>,
}

impl Trained {
    /// Reads the `kind` checkpoint of the run directory (or checkpoint file) `path`, and its
    /// config.
    pub fn open(path: &Path, kind: CheckpointKind) -> Result<Self> {
        let (ck, file, note) = Checkpoint::open(path, kind)?;
        let cfg = RunConfig::from_toml(&ck.meta.config_toml, &file)?;
        check_model_fits(&cfg, &ck.model, &file)?;
        Ok(Self {
            ck,
            file,
            cfg,
            note,
        })
    }

    /// The trained model on `be`'s device (`device` may be `be.device` or its autodiff form).
    pub fn model(&self, be: &crate::backend::Backend, device: &Device) -> Result<UNet> {
        let model = build_model(&self.cfg, device, be.caps);
        load_model(model, self.ck.model.clone(), &self.file)
    }
}
