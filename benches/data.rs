//! `cargo bench --bench data`: data loading throughput from shards: reading and checking a
//! sharded dataset (`Dataset::open`) and turning its slices into training batches on the loader
//! thread (intensity transform, targets), without augmentation and with nnU-Net's 2-D
//! augmentation probabilities (the `[augment]` example of `src/data/augment.rs`), in slices/s
//! with median and spread over repetitions. Sizes: 240² slices (the study's), 2048 of them.
//! Compare the augmented rate with the training step's (`ctseg bench step`): the loader keeps up
//! when it delivers a batch faster than a step consumes one.

use std::sync::Arc;
use std::time::Instant;

use ctseg::config::RunConfig;
use ctseg::data::augment::AugmentConfig;
use ctseg::data::{BatchMaker, Dataset, Loader};
use ctseg::util::stats::spread;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (size, volumes, slices, reps) = (240, 32, 64, 5);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ds");
    let threads = rayon::current_num_threads();
    Dataset::phantom(1, volumes, slices, size, threads).write(&path, 256, "phantom")?;
    let n = volumes * slices;
    let cfg = RunConfig::load(None)?;

    let mut open_t = Vec::new();
    let mut ds = None;
    for _ in 0..reps {
        let t = Instant::now();
        ds = Some(Dataset::open(&path)?);
        open_t.push(t.elapsed().as_secs_f64());
    }
    let ds = Arc::new(ds.ok_or("no dataset")?);
    let nnunet = AugmentConfig {
        rotation_prob: 0.2,
        scale_prob: 0.2,
        noise_prob: 0.1,
        blur_prob: 0.1,
        brightness_prob: 0.15,
        contrast_prob: 0.15,
        gamma_inverted_prob: 0.1,
        gamma_prob: 0.3,
        ..AugmentConfig::default()
    };
    let mut rows = vec![("Dataset::open (read, check, decode shards)", open_t)];
    for (what, augment) in [
        ("loader, batches of 32, no augmentation", None),
        ("loader, batches of 32, nnU-Net augmentation", Some(nnunet)),
    ] {
        let maker = BatchMaker {
            ds: ds.clone(),
            data: cfg.data.clone(),
            classes: 3,
            augment: augment.map(|a| (a, 1)),
        };
        let mut times = Vec::new();
        for rep in 0..reps {
            let batches: Vec<Vec<usize>> = (0..n)
                .collect::<Vec<_>>()
                .chunks(32)
                .map(<[usize]>::to_vec)
                .collect();
            let t = Instant::now();
            let m = maker.clone();
            let mut loader = Loader::spawn(batches, 4, move |idx| m.make(idx, rep as u64))?;
            let mut seen = 0;
            while let Some(b) = loader.next_batch()? {
                seen += b.len;
            }
            assert_eq!(seen, n);
            times.push(t.elapsed().as_secs_f64());
        }
        rows.push((what, times));
    }
    for (what, t) in &rows {
        let s = spread(t);
        println!(
            "{what}: {n} slices of {size}²: median {:.3} s [min {:.3}, max {:.3}, IQR {:.3}] = {:.0} slices/s",
            s.median,
            s.min,
            s.max,
            s.iqr,
            n as f64 / s.median
        );
    }
    Ok(())
}
