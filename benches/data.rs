//! `cargo bench --bench data`: data loading throughput from shards: reading and checking a
//! sharded dataset (`Dataset::open`) and turning its slices into training batches (the loader
//! thread: intensity transform and one-hot targets), in slices/s with median and spread over
//! repetitions. Sizes: 240² slices (the study's), 2048 of them.

use std::time::Instant;

use ctseg::config::RunConfig;
use ctseg::data::{Dataset, Loader, make_batch};
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
    let ds = std::sync::Arc::new(ds.ok_or("no dataset")?);
    let mut load_t = Vec::new();
    for _ in 0..reps {
        let batches: Vec<Vec<usize>> = (0..n)
            .collect::<Vec<_>>()
            .chunks(32)
            .map(<[usize]>::to_vec)
            .collect();
        let t = Instant::now();
        let (ds, data) = (ds.clone(), cfg.data.clone());
        let mut loader = Loader::spawn(batches, 4, move |idx| make_batch(&ds, &data, 3, idx))?;
        let mut seen = 0;
        while let Some(b) = loader.next_batch()? {
            seen += b.len;
        }
        assert_eq!(seen, n);
        load_t.push(t.elapsed().as_secs_f64());
    }
    for (what, t) in [
        ("Dataset::open (read, check, decode shards)", &open_t),
        ("loader (batches of 32)", &load_t),
    ] {
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
