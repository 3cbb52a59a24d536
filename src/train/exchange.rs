//! Gradient averaging across ranks: the trainable gradients are fused into a few large buckets
//! (tensor fusion), each copied off the device and summed with an in-place allreduce, optionally
//! compressed to fp16, and the allreduce of one bucket overlaps the copy of the next (a
//! communication thread runs the collectives). The time the step still waits for communication
//! after the last copy is reported as exposed.

use std::ops::Range;
use std::sync::mpsc;
use std::time::Instant;

use burn::optim::GradientsParams;
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::flat::{self, Slot};
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::model::UNet;

/// Gradient compression on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// fp32 (exact average up to summation order).
    None,
    /// IEEE half precision: half the bytes; each value rounded to 11 significant bits, sums
    /// accumulated in f32 and rounded back at every reduction step (Horovod's fp16 compression).
    Fp16,
}

/// The `[distributed]` config section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributedConfig {
    /// Fusion bucket size in MB (gradients are exchanged in buckets of about this size).
    pub bucket_mb: f64,
    /// `none` or `fp16`.
    pub grad_compression: Compression,
    /// Overlap the allreduce of one bucket with the copy of the next.
    pub overlap: bool,
}

impl DistributedConfig {
    /// Checks the values.
    pub fn validate(&self, source: &str) -> Result<()> {
        if !(self.bucket_mb > 0.0 && self.bucket_mb.is_finite()) {
            return Err(Error::ConfigValue {
                source_name: source.to_string(),
                field: "distributed.bucket_mb".into(),
                message: format!("must be positive, got {}", self.bucket_mb),
            });
        }
        Ok(())
    }
}

/// Seconds spent in the parts of one exchange.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExchangeTimes {
    /// Device → host copies (and fp16 packing) on the training thread.
    pub copy_s: f64,
    /// Communication the training thread waited for after its last copy (exposed).
    pub comm_s: f64,
    /// Total time of the allreduces themselves (overlapped or not).
    pub comm_total_s: f64,
}

/// Consecutive trainable-slot ranges of about `bucket_bytes` each (at least one slot each).
pub fn buckets(slots: &[Slot], bucket_bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (k, s) in slots.iter().enumerate() {
        bytes += 4 * s.len;
        if bytes >= bucket_bytes {
            out.push(start..k + 1);
            start = k + 1;
            bytes = 0;
        }
    }
    if start < slots.len() {
        out.push(start..slots.len());
    }
    out
}

/// f32 → IEEE half bits (round to nearest even).
pub fn to_f16(values: &[f32]) -> Vec<u16> {
    values
        .iter()
        .map(|&v| half::f16::from_f32(v).to_bits())
        .collect()
}

/// IEEE half bits → f32.
pub fn from_f16(bits: &[u16]) -> Vec<f32> {
    bits.iter()
        .map(|&b| half::f16::from_bits(b).to_f32())
        .collect()
}

fn reduce(comm: &dyn Communicator, buf: Vec<f32>, compression: Compression) -> Result<Vec<f32>> {
    match compression {
        Compression::None => {
            let mut buf = buf;
            comm.allreduce_sum_f32(&mut buf)?;
            Ok(buf)
        }
        Compression::Fp16 => {
            let mut bits = to_f16(&buf);
            comm.allreduce_sum_f16(&mut bits)?;
            Ok(from_f16(&bits))
        }
    }
}

/// Averages the gradients of `model` over all ranks of `comm`. Collective.
pub fn average(
    model: &UNet,
    grads: GradientsParams,
    slots: &[Slot],
    device: &Device,
    comm: &dyn Communicator,
    cfg: &DistributedConfig,
) -> Result<(GradientsParams, ExchangeTimes)> {
    if comm.size() == 1 {
        return Ok((grads, ExchangeTimes::default()));
    }
    let ranges = buckets(slots, (cfg.bucket_mb * 1e6) as usize);
    let mut times = ExchangeTimes::default();
    let mut reduced: Vec<Option<Vec<f32>>> = vec![None; ranges.len()];
    let overlap = cfg.overlap && ranges.len() > 1 && comm.concurrent_ok();
    if overlap {
        std::thread::scope(|scope| -> Result<()> {
            let (to_comm, inbox) = mpsc::channel::<(usize, Vec<f32>)>();
            let (to_main, results) = mpsc::channel::<(usize, Result<Vec<f32>>, f64)>();
            let compression = cfg.grad_compression;
            scope.spawn(move || {
                for (k, buf) in inbox {
                    let t = Instant::now();
                    let r = reduce(comm, buf, compression);
                    if to_main.send((k, r, t.elapsed().as_secs_f64())).is_err() {
                        return;
                    }
                }
            });
            for (k, r) in ranges.iter().enumerate() {
                let t = Instant::now();
                let buf = flat::flatten_grads_range(model, &grads, r.clone())?;
                times.copy_s += t.elapsed().as_secs_f64();
                if to_comm.send((k, buf)).is_err() {
                    break;
                }
            }
            drop(to_comm);
            let t = Instant::now();
            for (k, r, dt) in results {
                reduced[k] = Some(r?);
                times.comm_total_s += dt;
            }
            times.comm_s = t.elapsed().as_secs_f64();
            Ok(())
        })?;
    } else {
        for (k, r) in ranges.iter().enumerate() {
            let t = Instant::now();
            let buf = flat::flatten_grads_range(model, &grads, r.clone())?;
            times.copy_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            reduced[k] = Some(reduce(comm, buf, cfg.grad_compression)?);
            let dt = t.elapsed().as_secs_f64();
            times.comm_s += dt;
            times.comm_total_s += dt;
        }
    }
    let inv = 1.0 / comm.size() as f32;
    let mut all = Vec::with_capacity(slots.iter().map(|s| s.len).sum());
    for part in reduced {
        let part =
            part.ok_or_else(|| Error::Invalid("a gradient bucket was not reduced".into()))?;
        all.extend(part.into_iter().map(|v| v * inv));
    }
    Ok((flat::unflatten_grads(&all, slots, device)?, times))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_all_slots_in_order() {
        let slot = |len| Slot {
            id: burn::module::ParamId::new(),
            shape: vec![len],
            len,
        };
        let slots: Vec<Slot> = [10, 300, 5, 5, 1000, 2].into_iter().map(slot).collect();
        // 1000-byte buckets: 4·(10+300) = 1240 ≥ 1000 closes the first; 4·(5+5+1000) the second.
        assert_eq!(buckets(&slots, 1000), vec![0..2, 2..5, 5..6]);
        assert_eq!(buckets(&slots, 1 << 30), vec![0..6]);
        assert_eq!(
            buckets(&slots, 1),
            (0..6).map(|k| k..k + 1).collect::<Vec<_>>()
        );
    }

    #[test]
    fn fp16_round_trip_matches_ieee_half() {
        // Reference values from numpy: np.float16(x).view(np.uint16) for x in
        // [0.0, 1.0, -2.5, 65504.0, 1e-8, 0.1] → [0, 15360, 49408, 31743, 0, 11878].
        let x = [0.0f32, 1.0, -2.5, 65504.0, 1e-8, 0.1];
        assert_eq!(to_f16(&x), vec![0, 15360, 49408, 31743, 0, 11878]);
        let back = from_f16(&to_f16(&x));
        assert_eq!(&back[..4], &[0.0, 1.0, -2.5, 65504.0]);
        // 0.1 → 0.0999755859375 (nearest half).
        assert_eq!(back[5], 0.099_975_586);
    }
}
