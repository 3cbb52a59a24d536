//! `ctseg phantom` and `ctseg prepare`: datasets, synthetic or from real CT.

use anyhow::{Context, Result};

use ctseg::backend;
use ctseg::data::Dataset;
use ctseg::error::Error;
use ctseg::preview::Tile;

use crate::cli::args::{PhantomArgs, PrepareArgs};

/// `ctseg prepare`.
pub fn prepare(a: PrepareArgs) -> Result<()> {
    let opts = ctseg::data::prepare::PrepareOptions {
        input: a.input,
        out: a.out.clone(),
        size: a.size,
        folds: a.folds,
        margin: a.margin,
        resize: a.resize,
        per_shard: a.shard_slices,
        seed: a.seed,
        quiet: a.quiet,
    };
    let (m, summary) = ctseg::data::prepare::prepare(&opts)?;
    let mut counts = [0u64; 3];
    for v in &m.volumes {
        for (c, n) in counts.iter_mut().zip(v.label_counts) {
            *c += n;
        }
    }
    println!(
        "prepared {} volumes, {} slices of {}x{} in {:.1} s ({:.1} volumes/min) -> {} | pixels: background {}, liver {}, tumour {}{}",
        summary.volumes,
        summary.slices,
        m.height,
        m.width,
        summary.seconds,
        summary.volumes as f64 / summary.seconds.max(1e-9) * 60.0,
        a.out.display(),
        counts[0],
        counts[1],
        counts[2],
        if summary.skipped_no_liver.is_empty() {
            String::new()
        } else {
            format!(
                " | skipped (no liver): {}",
                summary.skipped_no_liver.join(", ")
            )
        }
    );
    Ok(())
}

/// `ctseg phantom`.
pub fn phantom(a: PhantomArgs) -> Result<()> {
    let bad = |m: String| anyhow::Error::from(Error::Argument(m));
    if a.count == 0 {
        return Err(bad("--count must be at least 1".into()));
    }
    if a.size < 16 {
        return Err(bad(format!(
            "--size must be at least 16 pixels, got {}",
            a.size
        )));
    }
    if a.slices_per_volume == 0 {
        return Err(bad("--slices-per-volume must be at least 1".into()));
    }
    let per = a.slices_per_volume;
    if a.count
        .checked_mul(a.size * a.size)
        .is_none_or(|n| n > ctseg::config::MAX_VALUES)
    {
        return Err(bad(format!(
            "--count {} × --size {}² is above {} voxels; generate fewer or smaller slices",
            a.count,
            a.size,
            ctseg::config::MAX_VALUES
        )));
    }
    let threads = backend::init_cpu_threads(a.threads);
    let mut ds = Dataset::phantom(a.seed, a.count.div_ceil(per), per, a.size, threads);
    ds.truncate(a.count);
    let source = format!(
        "ctseg phantom --seed {} --count {} --size {} --slices-per-volume {}",
        a.seed, a.count, a.size, per
    );
    let m = ds.write(&a.out, a.shard_slices, &source)?;
    println!(
        "wrote {} slices of {}x{} from {} phantom volumes in {} shard(s) to {}",
        m.slices,
        m.height,
        m.width,
        m.volumes.len(),
        m.shards.len(),
        a.out.display()
    );
    if let Some(png) = &a.preview {
        let n = ds.len().min(24);
        let step = (ds.len() / n.max(1)).max(1);
        let tiles: Vec<Tile> = (0..n)
            .map(|k| {
                let i = (k * step).min(ds.len() - 1);
                Tile {
                    image: ds.image(i).iter().map(|&v| f32::from(v)).collect(),
                    width: ds.size,
                    height: ds.size,
                    layers: vec![(ds.label(i), ctseg::preview::LABELS)],
                }
            })
            .collect();
        ctseg::preview::write_grid(png, &tiles, 6, [-200.0, 300.0])
            .with_context(|| format!("writing the preview {}", png.display()))?;
        println!("preview: {}", png.display());
    }
    Ok(())
}
