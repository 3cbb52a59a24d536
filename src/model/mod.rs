//! The model: livermask's U-Net, its layers, the Dice loss and metrics, and the layer summary.
//! Imports burn, and for the CPU convolution kernels burn's autodiff and flex crates and gemm.

pub mod cpuconv;
pub mod cpunorm;
pub mod cpuops;
pub mod layers;
pub mod loss;
pub mod summary;
pub mod unet;

pub use layers::Mode;
pub use loss::{DiceCounts, dice_loss, hard_counts, soft_dice};
pub use summary::{ModelSummary, summarize};
pub use unet::{Norm, UNet, UNetConfig, Upsampling};
