//! Sampling order (DistributedSampler semantics, by rank number only — no MPI here) and a
//! background loader thread that turns slice indices into ready-made host batches ahead of the
//! training loop.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::augment::{AugmentConfig, SliceOut, SliceRef, augment_slice};
use super::dataset::{DataConfig, Dataset, Sampling};
use crate::error::{Error, Result};
use crate::rng::{Rng, keys};

/// Which slices one rank trains on, epoch by epoch.
#[derive(Clone, Debug)]
pub struct Sampler {
    /// Shared by the samplers of one rank's micro-batch streams.
    pool: Arc<[usize]>,
    batch: usize,
    rank: usize,
    world: usize,
    seed: u64,
    sampling: Sampling,
    /// Slices that hold the rare class, and the share of every batch taken from them.
    oversample: Option<(Arc<[usize]>, f64)>,
}

impl Sampler {
    /// Sampler over `pool` (the training slice indices) for `rank` of `world`.
    pub fn new(
        pool: impl Into<Arc<[usize]>>,
        batch: usize,
        rank: usize,
        world: usize,
        seed: u64,
        sampling: Sampling,
    ) -> Self {
        Self {
            pool: pool.into(),
            batch: batch.max(1),
            rank,
            world: world.max(1),
            seed,
            sampling,
            oversample: None,
        }
    }

    /// Class-balanced sampling, as nnU-Net's foreground oversampling: in every batch,
    /// ⌈`fraction` × batch⌉ places (the last ones) hold a slice drawn from `rare` (e.g. the
    /// training slices with tumour) unless they already do. The draws are seeded by (seed,
    /// epoch, this rank's stream, batch), so resumed runs draw the same.
    pub fn with_oversampling(mut self, rare: impl Into<Arc<[usize]>>, fraction: f64) -> Self {
        let rare = rare.into();
        if fraction > 0.0 && !rare.is_empty() {
            self.oversample = Some((rare, fraction));
        }
        self
    }

    /// Slices each rank sees per epoch (the pool padded up to a multiple of the rank count).
    pub fn per_rank(&self) -> usize {
        self.pool.len().div_ceil(self.world)
    }

    /// Optimiser steps per epoch: the same on every rank, incomplete last batch dropped
    /// (livermask: `(N_train // batch) // workers`).
    pub fn steps_per_epoch(&self) -> usize {
        match self.sampling {
            Sampling::Sharded => self.per_rank() / self.batch,
            Sampling::Independent => self.pool.len() / self.batch / self.world,
        }
    }

    /// This rank's slice order for `epoch`.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        match self.sampling {
            Sampling::Sharded => {
                let mut perm = self.pool.to_vec();
                Rng::stream(self.seed, &[keys::SAMPLER, epoch]).shuffle(&mut perm);
                let total = self.per_rank() * self.world;
                let mut k = 0;
                while perm.len() < total {
                    perm.push(perm[k]);
                    k += 1;
                }
                perm.into_iter()
                    .skip(self.rank)
                    .step_by(self.world)
                    .collect()
            }
            Sampling::Independent => {
                let mut perm = self.pool.to_vec();
                Rng::stream(self.seed, &[keys::SAMPLER, epoch, self.rank as u64 + 1])
                    .shuffle(&mut perm);
                perm
            }
        }
    }

    /// This rank's batches for `epoch`, `steps_per_epoch()` of them.
    pub fn epoch_batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        let order = self.epoch_order(epoch);
        let mut batches: Vec<Vec<usize>> = order
            .chunks_exact(self.batch)
            .take(self.steps_per_epoch())
            .map(<[usize]>::to_vec)
            .collect();
        if let Some((rare, fraction)) = &self.oversample {
            let places = ((fraction * self.batch as f64).ceil() as usize).min(self.batch);
            let is_rare: std::collections::HashSet<usize> = rare.iter().copied().collect();
            for (b, batch) in batches.iter_mut().enumerate() {
                let mut rng = Rng::stream(
                    self.seed,
                    &[keys::OVERSAMPLE, epoch, self.rank as u64, b as u64],
                );
                let have = batch.iter().filter(|i| is_rare.contains(i)).count();
                let mut missing = places.saturating_sub(have);
                for slot in batch.iter_mut().rev() {
                    if missing == 0 {
                        break;
                    }
                    if !is_rare.contains(slot) {
                        *slot = rare[rng.below(rare.len() as u64) as usize];
                        missing -= 1;
                    }
                }
            }
        }
        batches
    }
}

/// A batch on the host, ready to become tensors.
#[derive(Clone, Debug)]
pub struct HostBatch {
    /// Images in this batch.
    pub len: usize,
    /// Side length.
    pub size: usize,
    /// Input channels per image (1: the slice alone).
    pub channels: usize,
    /// `[len, channels, size, size]` network inputs.
    pub inputs: Vec<f32>,
    /// `[len, classes, size, size]` targets: channel 0 = label 0, channel c ≥ 1 = label ≥ c.
    pub targets: Vec<f32>,
    /// Classes (target channels).
    pub classes: usize,
}

/// How slices become a batch: the intensity transform, the 2.5-D context slices as extra
/// input channels, one-hot-style targets and, for training only, the augmentation.
#[derive(Clone)]
pub struct BatchMaker {
    /// The slices.
    pub ds: Arc<Dataset>,
    /// Intensity transform and context.
    pub data: DataConfig,
    /// Target channels.
    pub classes: usize,
    /// Training: the augmentation and the run's seed (`None`: validation and benchmarks).
    pub augment: Option<(AugmentConfig, u64)>,
}

impl BatchMaker {
    /// The batch of slices `indices` in `epoch` (which keys the augmentation: see
    /// [`super::augment`]).
    pub fn make(&self, indices: &[usize], epoch: u64) -> HostBatch {
        let ds = &self.ds;
        let (px, k) = (ds.pixels(), self.data.context_slices);
        let channels = 1 + 2 * k;
        let augment = self.augment.as_ref().filter(|(a, _)| a.enabled());
        let units = self.data.input_scale();
        let mut inputs = Vec::with_capacity(indices.len() * channels * px);
        let mut targets = vec![0.0f32; indices.len() * self.classes * px];
        let mut label = vec![0u8; px];
        let mut out = vec![0.0f32; px];
        for (b, &i) in indices.iter().enumerate() {
            label.copy_from_slice(ds.label(i));
            for j in ds.context(i, k) {
                let image: Vec<f32> = ds
                    .image(j)
                    .iter()
                    .map(|&h| self.data.transform(h))
                    .collect();
                match augment {
                    // Every channel takes the same draws, so the same spatial map and intensity
                    // change: the context stays aligned with the slice and its label.
                    Some((cfg, seed)) => {
                        let mut rng = Rng::stream(*seed, &[keys::AUGMENT, epoch, i as u64]);
                        let input = SliceRef {
                            image: &image,
                            label: ds.label(i),
                            size: ds.size,
                        };
                        let into = SliceOut {
                            image: &mut out,
                            label: &mut label,
                        };
                        augment_slice(input, cfg, &units, &mut rng, into);
                        inputs.extend_from_slice(&out);
                    }
                    None => inputs.extend_from_slice(&image),
                }
            }
            one_hot(
                &label,
                self.classes,
                &mut targets[b * self.classes * px..][..self.classes * px],
            );
        }
        HostBatch {
            len: indices.len(),
            size: ds.size,
            channels,
            inputs,
            targets,
            classes: self.classes,
        }
    }
}

/// Target channels of one slice's labels: channel 0 = label 0, channel c ≥ 1 = label ≥ c.
fn one_hot(label: &[u8], classes: usize, out: &mut [f32]) {
    let px = label.len();
    for c in 0..classes {
        for (v, &l) in out[c * px..(c + 1) * px].iter_mut().zip(label) {
            let on = if c == 0 { l == 0 } else { l as usize >= c };
            *v = if on { 1.0 } else { 0.0 };
        }
    }
}

/// The batch of slices `indices` without augmentation (validation, benchmarks, tests).
pub fn make_batch(ds: &Dataset, cfg: &DataConfig, classes: usize, indices: &[usize]) -> HostBatch {
    let (px, k) = (ds.pixels(), cfg.context_slices);
    let mut inputs = Vec::with_capacity(indices.len() * (1 + 2 * k) * px);
    let mut targets = vec![0.0f32; indices.len() * classes * px];
    for (b, &i) in indices.iter().enumerate() {
        for j in ds.context(i, k) {
            inputs.extend(ds.image(j).iter().map(|&h| cfg.transform(h)));
        }
        one_hot(
            ds.label(i),
            classes,
            &mut targets[b * classes * px..][..classes * px],
        );
    }
    HostBatch {
        len: indices.len(),
        size: ds.size,
        channels: 1 + 2 * k,
        inputs,
        targets,
        classes,
    }
}

/// A loader thread producing batches in order, `prefetch` ahead of the consumer.
pub struct Loader {
    rx: Option<Receiver<HostBatch>>,
    handle: Option<JoinHandle<()>>,
    waited: Duration,
    expected: usize,
    delivered: usize,
}

/// The message of a panic payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Loader {
    /// Starts a thread that builds `batches` in order. `make` turns one batch of slice indices
    /// into a host batch (see [`make_batch`]).
    pub fn spawn(
        batches: Vec<Vec<usize>>,
        prefetch: usize,
        mut make: impl FnMut(&[usize]) -> HostBatch + Send + 'static,
    ) -> Result<Self> {
        let expected = batches.len();
        let (tx, rx): (SyncSender<HostBatch>, Receiver<HostBatch>) = sync_channel(prefetch.max(1));
        let handle = std::thread::Builder::new()
            .name("ctseg-loader".into())
            .spawn(move || {
                for idx in batches {
                    if tx.send(make(&idx)).is_err() {
                        return; // consumer gone
                    }
                }
            })
            .map_err(|e| Error::Invalid(format!("starting the data loader thread: {e}")))?;
        Ok(Self {
            rx: Some(rx),
            handle: Some(handle),
            waited: Duration::ZERO,
            expected,
            delivered: 0,
        })
    }

    /// Next batch, or `None` when all were delivered. Time spent blocked is accumulated. A
    /// loader that stops before delivering every batch (its thread panicked) is an error, never
    /// an early end of the data: a rank that ended its epoch early would leave the others
    /// waiting in a collective.
    pub fn next_batch(&mut self) -> Result<Option<HostBatch>> {
        if self.delivered == self.expected {
            return Ok(None);
        }
        let t = Instant::now();
        let b = self.rx.as_ref().and_then(|rx| rx.recv().ok());
        self.waited += t.elapsed();
        match b {
            Some(b) => {
                self.delivered += 1;
                Ok(Some(b))
            }
            None => {
                let why = match self.handle.take().map(JoinHandle::join) {
                    Some(Err(p)) => format!("it panicked: {}", panic_message(p.as_ref())),
                    _ => "it stopped".into(),
                };
                Err(Error::Invalid(format!(
                    "the data loader delivered {} of {} batches: {why}",
                    self.delivered, self.expected
                )))
            }
        }
    }

    /// Total time the consumer waited on data so far.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.rx.take(); // unblocks a sender waiting on a full channel
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_ranks_partition_one_permutation_with_equal_steps() {
        let pool: Vec<usize> = (0..10).collect();
        let s: Vec<Sampler> = (0..3)
            .map(|r| Sampler::new(pool.clone(), 2, r, 3, 7, Sampling::Sharded))
            .collect();
        let orders: Vec<Vec<usize>> = s.iter().map(|x| x.epoch_order(4)).collect();
        assert!(
            orders.iter().all(|o| o.len() == 4),
            "10 padded to 12, 4 per rank"
        );
        let mut all: Vec<usize> = orders.concat();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all, pool, "every slice is seen");
        assert!(s.iter().all(|x| x.steps_per_epoch() == 2));
        assert_ne!(
            s[0].epoch_order(4),
            s[0].epoch_order(5),
            "new order per epoch"
        );
    }

    #[test]
    fn one_rank_takes_everything() {
        let pool: Vec<usize> = (0..9).collect();
        let s = Sampler::new(pool.clone(), 4, 0, 1, 1, Sampling::Sharded);
        let mut o = s.epoch_order(0);
        o.sort_unstable();
        assert_eq!(o, pool);
        assert_eq!(s.epoch_batches(0).len(), 2);
    }

    #[test]
    fn nested_targets() {
        let ds = Dataset {
            origin: "t".into(),
            fingerprint: String::new(),
            size: 1,
            images: vec![0, 0, 0],
            labels: vec![0, 1, 2],
            volume_ids: vec![0, 0, 0],
            slice_indices: vec![0, 1, 2],
            volume_names: Default::default(),
            folds: Default::default(),
            positions: Default::default(),
            resize: Default::default(),
        };
        let cfg = DataConfig {
            intensity: super::super::dataset::Intensity::Raw,
            window: [0.0, 1.0],
            val_fraction: 0.5,
            phantom_volumes: 2,
            phantom_slices: 1,
            prefetch: 1,
            sampling: Sampling::Sharded,
            fold: None,
            context_slices: 0,
            oversample_tumour: 0.0,
        };
        let b = make_batch(&ds, &cfg, 3, &[0, 1, 2]);
        // label 0 → [1,0,0]; 1 → [0,1,0]; 2 → [0,1,1] (liver channel includes tumour).
        assert_eq!(b.targets, vec![1., 0., 0., 0., 1., 0., 0., 1., 1.]);
    }

    #[test]
    fn a_loader_that_dies_is_an_error_not_an_end_of_data() {
        let mut l = Loader::spawn(vec![vec![0], vec![1], vec![2]], 1, |idx| {
            assert!(idx[0] < 1, "injected loader failure");
            HostBatch {
                len: 1,
                size: 1,
                channels: 1,
                inputs: vec![0.0],
                targets: vec![0.0],
                classes: 1,
            }
        })
        .expect("spawn");
        assert!(matches!(l.next_batch(), Ok(Some(_))));
        let e = l
            .next_batch()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("1 of 3 batches") && e.contains("injected loader failure"),
            "{e}"
        );
    }

    #[test]
    fn a_loader_ends_after_its_batches() {
        let mut l = Loader::spawn(vec![vec![0]], 2, |_| HostBatch {
            len: 1,
            size: 1,
            channels: 1,
            inputs: vec![0.0],
            targets: vec![0.0],
            classes: 1,
        })
        .expect("spawn");
        assert!(matches!(l.next_batch(), Ok(Some(_))));
        assert!(matches!(l.next_batch(), Ok(None)));
    }

    fn raw_config(context_slices: usize) -> DataConfig {
        DataConfig {
            intensity: super::super::dataset::Intensity::Raw,
            window: [0.0, 1.0],
            val_fraction: 0.5,
            phantom_volumes: 2,
            phantom_slices: 1,
            prefetch: 1,
            sampling: Sampling::Sharded,
            fold: None,
            context_slices,
            oversample_tumour: 0.0,
        }
    }

    #[test]
    fn oversampling_puts_rare_slices_in_every_batch() {
        // 40 slices, 2 of them rare; half of every batch of 4 must be rare (2 places), the
        // same draw each time the epoch is asked for.
        let pool: Vec<usize> = (0..40).collect();
        let s =
            Sampler::new(pool, 4, 0, 1, 3, Sampling::Sharded).with_oversampling(vec![7, 30], 0.5);
        let batches = s.epoch_batches(2);
        assert_eq!(batches.len(), 10);
        for b in &batches {
            assert!(
                b.iter().filter(|i| **i == 7 || **i == 30).count() >= 2,
                "{b:?}"
            );
        }
        assert_eq!(batches, s.epoch_batches(2));
    }

    #[test]
    fn context_channels_are_the_neighbours_with_edge_slices_repeated() {
        // One volume of three 1-pixel slices with HU 10, 20, 30 and raw intensities: with one
        // context slice, slice 0 sees (10, 10, 20) (its missing lower neighbour repeats the edge),
        // slice 1 sees (10, 20, 30).
        let ds = Dataset::phantom(1, 1, 3, 16, 1);
        let mut ds = ds;
        ds.size = 1;
        ds.images = vec![10, 20, 30];
        ds.labels = vec![0, 1, 2];
        let b = make_batch(&ds, &raw_config(1), 3, &[0, 1]);
        assert_eq!(b.channels, 3);
        assert_eq!(b.inputs, vec![10.0, 10.0, 20.0, 10.0, 20.0, 30.0]);
    }

    #[test]
    fn a_slice_is_augmented_the_same_whatever_batch_it_is_in() {
        // The augmentation is keyed by (seed, epoch, slice index) only (see augment.rs): slice 5
        // comes out the same in the batch [4, 5] and alone, and differently in another epoch.
        let ds = Arc::new(Dataset::phantom(1, 2, 6, 32, 1));
        let augment = super::super::augment::AugmentConfig {
            rotation_prob: 1.0,
            noise_prob: 1.0,
            ..Default::default()
        };
        let maker = BatchMaker {
            ds,
            data: raw_config(0),
            classes: 3,
            augment: Some((augment, 9)),
        };
        let px = 32 * 32;
        let pair = maker.make(&[4, 5], 1);
        let alone = maker.make(&[5], 1);
        assert_eq!(pair.inputs[px..], alone.inputs[..]);
        assert_eq!(pair.targets[3 * px..], alone.targets[..]);
        assert_ne!(maker.make(&[5], 2).inputs, alone.inputs);
    }
}
