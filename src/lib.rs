//! ctseg: a CT segmentation trainer that runs livermask's U-Net on a CPU (burn flex) or a GPU
//! (burn wgpu) and spreads training over ranks, so GPU workstations and CPU clusters can be
//! compared on the same work.

pub mod backend;
pub mod bench;
pub mod comm;
pub mod config;
pub mod data;
pub mod detmath;
pub mod error;
pub mod export;
pub mod faults;
pub mod finite;
pub mod fp16;
pub mod infer;
pub mod model;
pub mod optim;
pub mod preview;
pub mod report;
pub mod rng;
pub mod rundir;
pub mod tensor_util;
pub mod train;
pub mod util;
pub mod verify;
pub mod wgsl;

pub use error::{Error, Result};
