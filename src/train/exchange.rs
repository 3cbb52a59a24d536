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
use crate::fp16;
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
    /// Device ↔ host copies (with fp16 packing and unpacking) on the training thread.
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

/// One bucket on its way through the exchange.
enum Payload {
    F32(Vec<f32>),
    /// IEEE half bits.
    F16(Vec<u16>),
}

/// Copies the gradients of slots `range` off the device, packed to fp16 if asked (on the
/// device when it is a wgpu adapter, so only half the bytes cross the bus).
fn copy_bucket(
    model: &UNet,
    grads: &GradientsParams,
    range: Range<usize>,
    compression: Compression,
    on_device: bool,
) -> Result<Payload> {
    Ok(match compression {
        Compression::None => Payload::F32(flat::flatten_grads_range(model, grads, range)?),
        Compression::Fp16 if on_device => {
            match flat::flatten_grads_range_device(model, grads, range)? {
                Some(t) => Payload::F16(fp16::pack_on_device(t)?),
                None => Payload::F16(Vec::new()),
            }
        }
        Compression::Fp16 => Payload::F16(fp16::to_f16(&flat::flatten_grads_range(
            model, grads, range,
        )?)),
    })
}

fn reduce(comm: &dyn Communicator, payload: Payload) -> Result<Payload> {
    match payload {
        Payload::F32(mut buf) => {
            comm.allreduce_sum_f32(&mut buf)?;
            Ok(Payload::F32(buf))
        }
        Payload::F16(mut bits) => {
            comm.allreduce_sum_f16(&mut bits)?;
            Ok(Payload::F16(bits))
        }
    }
}

/// One line saying how the gradients are exchanged (logged and kept in `summary.json`).
pub fn describe(cfg: &DistributedConfig, slots: &[Slot], device: &Device, world: usize) -> String {
    if world == 1 {
        return "none (single process)".into();
    }
    let n = buckets(slots, (cfg.bucket_mb * 1e6) as usize).len();
    let wire = match cfg.grad_compression {
        Compression::None => "fp32",
        Compression::Fp16 if fp16::device_kernels_apply(device) => {
            "fp16 packed and unpacked on the device (WGSL)"
        }
        Compression::Fp16 => "fp16 packed on the host",
    };
    format!(
        "{n} bucket(s) of <= {} MB, {wire}, overlap {}",
        cfg.bucket_mb,
        if cfg.overlap { "on" } else { "off" }
    )
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
    let mut reduced: Vec<Option<Payload>> = (0..ranges.len()).map(|_| None).collect();
    let overlap = cfg.overlap && ranges.len() > 1 && comm.concurrent_ok();
    let compression = cfg.grad_compression;
    let on_device = fp16::device_kernels_apply(device);
    if overlap {
        std::thread::scope(|scope| -> Result<()> {
            let (to_comm, inbox) = mpsc::channel::<(usize, Payload)>();
            let (to_main, results) = mpsc::channel::<(usize, Result<Payload>, f64)>();
            scope.spawn(move || {
                for (k, buf) in inbox {
                    let t = Instant::now();
                    let r = reduce(comm, buf);
                    if to_main.send((k, r, t.elapsed().as_secs_f64())).is_err() {
                        return;
                    }
                }
            });
            for (k, r) in ranges.iter().enumerate() {
                let t = Instant::now();
                let buf = copy_bucket(model, &grads, r.clone(), compression, on_device)?;
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
            let buf = copy_bucket(model, &grads, r.clone(), compression, on_device)?;
            times.copy_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            reduced[k] = Some(reduce(comm, buf)?);
            let dt = t.elapsed().as_secs_f64();
            times.comm_s += dt;
            times.comm_total_s += dt;
        }
    }
    let inv = 1.0 / comm.size() as f32;
    let total = slots.iter().map(|s| s.len).sum();
    let parts = reduced
        .into_iter()
        .map(|p| p.ok_or_else(|| Error::Invalid("a gradient bucket was not reduced".into())))
        .collect::<Result<Vec<_>>>()?;
    let t = Instant::now();
    let averaged = if compression == Compression::Fp16 && on_device {
        // Unpack and scale on the device: half the bytes go up, nothing f32 crosses the bus.
        let mut bits = Vec::with_capacity(total);
        for part in parts {
            match part {
                Payload::F16(b) => bits.extend_from_slice(&b),
                Payload::F32(_) => return Err(Error::Invalid("mixed gradient payloads".into())),
            }
        }
        flat::unflatten_grads_tensor(fp16::unpack_on_device(&bits, inv, device)?, slots)?
    } else {
        let mut all = Vec::with_capacity(total);
        for part in parts {
            match part {
                Payload::F32(v) => all.extend(v.into_iter().map(|v| v * inv)),
                Payload::F16(b) => all.extend(
                    b.into_iter()
                        .map(|h| half::f16::from_bits(h).to_f32() * inv),
                ),
            }
        }
        flat::unflatten_grads(&all, slots, device)?
    };
    times.copy_s += t.elapsed().as_secs_f64();
    Ok((averaged, times))
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
}
