//! The run config: load TOML (a file or the built-in quick config) → apply command-line
//! overrides → validate. Unknown keys are errors that name the key and the file.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::DataConfig;
use crate::error::{Error, Result};
use crate::model::UNetConfig;
use crate::optim::{OptimizerConfig, ScheduleConfig};
use crate::train::TrainConfig;
use crate::train::exchange::{Compression, DistributedConfig};

/// The built-in default config (`configs/quick.toml`).
pub const QUICK_TOML: &str = include_str!("../configs/quick.toml");
/// The paper's config (`configs/livermask.toml`).
pub const LIVERMASK_TOML: &str = include_str!("../configs/livermask.toml");

/// A complete run config: every key must be present.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Seed of every random stream of the run (weights, phantoms, split, sampling, dropout).
    pub seed: u64,
    /// `[model]`.
    pub model: UNetConfig,
    /// `[data]`.
    pub data: DataConfig,
    /// `[train]`.
    pub train: TrainConfig,
    /// `[optimizer]`.
    pub optimizer: OptimizerConfig,
    /// `[schedule]`.
    pub schedule: ScheduleConfig,
    /// `[distributed]`.
    pub distributed: DistributedConfig,
    /// `[augment]` (optional: absent means no augmentation).
    #[serde(default)]
    pub augment: crate::data::augment::AugmentConfig,
}

/// The most values (voxels or input pixels) a config may size one allocation by: 2^32, 4 to 16
/// GiB depending on the type; a real run is orders of magnitude below.
pub const MAX_VALUES: usize = 1 << 32;

/// Command-line overrides; `None` keeps the config's value.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `train.epochs`.
    pub epochs: Option<u64>,
    /// `train.batch_size`.
    pub batch_size: Option<usize>,
    /// `optimizer.lr`.
    pub lr: Option<f64>,
    /// `train.max_steps`.
    pub max_steps: Option<u64>,
    /// `seed`.
    pub seed: Option<u64>,
    /// `model.width`.
    pub width: Option<usize>,
    /// `model.input_size`.
    pub size: Option<usize>,
    /// `distributed.grad_compression`.
    pub grad_compression: Option<Compression>,
    /// `data.fold`.
    pub fold: Option<usize>,
    /// `train.accumulate`.
    pub accumulate: Option<usize>,
    /// `train.precision`.
    pub precision: Option<crate::train::precision::Precision>,
}

impl RunConfig {
    /// Parses TOML text; `source` names it in errors.
    pub fn from_toml(text: &str, source: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::ConfigParse {
            path: source.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// Reads a config file, or the built-in quick config when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::ConfigParse {
                    path: p.to_path_buf(),
                    message: format!("cannot read it: {e}"),
                })?;
                Self::from_toml(&text, p)
            }
            None => Self::from_toml(QUICK_TOML, Path::new("configs/quick.toml (built in)")),
        }
    }

    /// Applies command-line overrides.
    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = o.epochs {
            self.train.epochs = v;
        }
        if let Some(v) = o.batch_size {
            self.train.batch_size = v;
        }
        if let Some(v) = o.lr {
            self.optimizer.set_lr(v);
        }
        if let Some(v) = o.max_steps {
            self.train.max_steps = v;
        }
        if let Some(v) = o.seed {
            self.seed = v;
        }
        if let Some(v) = o.width {
            self.model.width = v;
        }
        if let Some(v) = o.size {
            self.model.input_size = v;
        }
        if let Some(v) = o.accumulate {
            self.train.accumulate = v;
        }
        if let Some(v) = o.precision {
            self.train.precision = v;
        }
        if let Some(v) = o.fold {
            self.data.fold = Some(v);
        }
        if let Some(v) = o.grad_compression {
            self.distributed.grad_compression = v;
        }
    }

    /// Checks every section; `source` names the config in messages.
    pub fn validate(&self, source: &str) -> Result<()> {
        self.model.validate(source)?;
        self.data.validate(source)?;
        self.train.validate(source)?;
        self.optimizer.validate(source)?;
        self.schedule.validate(source)?;
        self.distributed.validate(source)?;
        self.augment
            .validate(source)
            .map_err(|e| Error::ConfigValue {
                source_name: e.source_name,
                field: e.field,
                message: e.message,
            })?;
        self.check_sizes(source)?;
        // A run writes its resolved config; a value TOML cannot hold (an integer above
        // i64::MAX, which only a command-line flag can give) is refused here by its field.
        let mut text = String::new();
        serde_path_to_error::serialize(self, toml::Serializer::new(&mut text)).map_err(|e| {
            let inner = e.inner().to_string();
            let message = if inner.contains("out-of-range") {
                format!(
                    "is above {}, the largest integer the run's TOML config holds (was it given on the command line?)",
                    i64::MAX
                )
            } else {
                inner
            };
            Error::ConfigValue {
                source_name: source.to_string(),
                field: e.path().to_string(),
                message,
            }
        })?;
        Ok(())
    }

    /// Products of fields that are each in range but together would size an allocation no node
    /// has: one step's input images and the phantom dataset, both checked without overflow.
    fn check_sizes(&self, source: &str) -> Result<()> {
        let px = self.model.input_size.checked_mul(self.model.input_size);
        let bad = |field: &str, what: String| Error::ConfigValue {
            source_name: source.to_string(),
            field: field.to_string(),
            message: format!("{what} is above {MAX_VALUES} values; lower it"),
        };
        let step = px
            .and_then(|p| p.checked_mul(self.train.batch_size))
            .and_then(|p| p.checked_mul(self.train.accumulate))
            .and_then(|p| p.checked_mul(self.data.in_channels()));
        if step.is_none_or(|n| n > MAX_VALUES) {
            return Err(bad(
                "train.batch_size",
                format!(
                    "one step's input (batch_size {} × accumulate {} × {} channel(s) × {}²)",
                    self.train.batch_size,
                    self.train.accumulate,
                    self.data.in_channels(),
                    self.model.input_size
                ),
            ));
        }
        let phantom = px
            .and_then(|p| p.checked_mul(self.data.phantom_volumes))
            .and_then(|p| p.checked_mul(self.data.phantom_slices));
        if phantom.is_none_or(|n| n > MAX_VALUES) {
            return Err(bad(
                "data.phantom_volumes",
                format!(
                    "the phantom dataset (phantom_volumes {} × phantom_slices {} × {}²)",
                    self.data.phantom_volumes, self.data.phantom_slices, self.model.input_size
                ),
            ));
        }
        Ok(())
    }

    /// The resolved config as TOML (written to `config.resolved.toml` in the run directory).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Invalid(format!("serialising the config: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_configs_parse_and_validate() {
        for (name, text) in [("quick", QUICK_TOML), ("livermask", LIVERMASK_TOML)] {
            let c = RunConfig::from_toml(text, Path::new(name));
            assert!(c.is_ok(), "{name}: {:?}", c.err());
            if let Ok(c) = c {
                assert!(
                    c.validate(name).is_ok(),
                    "{name}: {:?}",
                    c.validate(name).err()
                );
                // The resolved form parses back to the same config.
                let again = c
                    .to_toml()
                    .and_then(|t| RunConfig::from_toml(&t, Path::new(name)));
                assert_eq!(again.ok(), Some(c));
            }
        }
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let text = QUICK_TOML.replace("[train]", "[train]\nbatch_sise = 3");
        let e = RunConfig::from_toml(&text, Path::new("my.toml"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("my.toml") && e.contains("batch_sise"), "{e}");
    }

    #[test]
    fn missing_key_is_an_error() {
        let text = QUICK_TOML.replace("seed = ", "# seed = ");
        let e = RunConfig::from_toml(&text, Path::new("m.toml"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("seed"), "{e}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let base = RunConfig::load(None).expect("quick config");
        let mut c = base.clone();
        c.train.batch_size = 0;
        let e = c
            .validate("q.toml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("train.batch_size") && e.contains("q.toml"),
            "{e}"
        );
        let mut c = base.clone();
        c.model.input_size = 100; // not a multiple of 2^4
        let e = c
            .validate("q.toml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("model.input_size") && e.contains("16"), "{e}");
        let text = QUICK_TOML.replace("name = \"adam\"", "name = \"lbfgs\"");
        let e = RunConfig::from_toml(&text, Path::new("o.toml"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("lbfgs") && e.contains("adadelta"), "{e}");
    }
}
