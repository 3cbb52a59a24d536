//! Data: the phantom generator, NIfTI volumes and DICOM series and their preparation into datasets, the
//! slice-shard format, datasets and their split by volume or fold, sampling and the background
//! loader. Knows rank and world as numbers, never MPI.

pub mod augment;
pub mod dataset;
pub mod dicom;
pub mod loader;
pub mod nifti;
pub mod phantom;
pub mod prepare;
pub mod shard;

pub use dataset::{DataConfig, Dataset, Intensity, Sampling};
pub use loader::{BatchMaker, HostBatch, Loader, Sampler, make_batch};
