//! Data: the phantom generator, the slice-shard format, datasets and their split by volume,
//! sampling and the background loader. Knows rank and world as numbers, never MPI.

pub mod dataset;
pub mod loader;
pub mod phantom;
pub mod shard;

pub use dataset::{DataConfig, Dataset, Intensity, Sampling};
pub use loader::{HostBatch, Loader, Sampler, make_batch};
