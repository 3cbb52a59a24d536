//! The model: livermask's U-Net, its one architecture description, its layers, the operations
//! facade that picks each operation's implementation for the device, the CPU kernels, the GPU
//! kernels (3×3 convolution, batch normalisation; cubek's cooperative-matrix convolutions on
//! SPIR-V), the Dice loss and metrics, and the layer summary. Imports burn, and for the CPU
//! kernels burn's autodiff and flex crates and gemm.

pub mod arch;
pub mod cmma_conv;
pub mod cpu;
pub mod gpu_conv;
pub mod gpu_norm;
pub mod layers;
pub mod loss;
pub mod ops;
pub mod summary;
pub mod unet;

pub use layers::Mode;
pub use loss::{DiceCounts, LossKind, bce_with_logits, dice_loss, hard_counts, soft_dice};
pub use ops::{DeviceCaps, GpuConv};
pub use summary::{ModelSummary, summarize, summarize_with_inputs};
pub use unet::{Norm, UNet, UNetConfig, Upsampling};
