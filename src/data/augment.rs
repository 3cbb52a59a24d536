//! Data augmentation of training slices: the `[augment]` config section and [`augment_slice`],
//! which applies random spatial and intensity transforms to one slice and its label, as nnU-Net
//! (batchgenerators) and MONAI do for every CT model.
//!
//! # Where it runs, and the keying contract
//!
//! The loader thread augments each *training* slice after the intensity transform
//! (`DataConfig::transform`: raw HU, or a window mapped to [0, 1]) and before the label becomes
//! target channels. Validation, `predict` and `evaluate` never augment.
//!
//! The caller creates one generator per slice and epoch:
//!
//! ```text
//! let mut rng = Rng::stream(seed, &[keys::AUGMENT, epoch, slice_index]);
//! ```
//!
//! where `seed` is the run's seed, `epoch` the epoch being trained and `slice_index` the slice's
//! index in the `Dataset` (the `i` of `ds.image(i)`), **not** its position
//! in a batch, in a rank's order or in a thread's share. The augmentation of a slice is then a
//! function of (config, seed, epoch, slice) alone: the same on any rank count, thread count,
//! batch size or prefetch depth, and the same after `--resume`. Consequences worth knowing: a
//! slice that appears twice in one epoch (the sharded sampler's padding, or `independent`
//! sampling on several ranks) gets the same augmentation both times; a new epoch gives a new
//! augmentation.
//!
//! # Order of operations
//!
//! 1. **Spatial**, as ONE sampling map applied once: for every output pixel the source position
//!    is computed by composing mirroring, the elastic displacement, and rotation·scaling about
//!    the slice centre; the image is sampled there **bilinearly**, the label by **nearest
//!    neighbour** (labels are never interpolated, so they stay in the set of input values plus
//!    0). Positions outside the slice give the image the *air* value of [`InputScale`] and the
//!    label 0. When no spatial transform fires, image and label are copied bit for bit.
//! 2. **Intensity**, on the image only, in nnU-Net's order: Gaussian noise, Gaussian blur,
//!    brightness (multiplicative), contrast, gamma on the inverted image, gamma.
//!
//! There is no final clipping (nnU-Net has none either): with a window, noise and brightness
//! can take values slightly outside [0, 1].
//!
//! # Geometry conventions
//!
//! Pixel `(row y, column x)` has its centre at the point `(x, y)`; the slice centre is
//! `c = ((size − 1)/2, (size − 1)/2)` (between pixels for an even size). For an output pixel `p`
//! the source point is
//!
//! ```text
//! q   = M·(p − c) + e(p)          M = diag(±1, ±1): mirroring; e: elastic displacement (pixels)
//! src = c + R(−θ)·q / s
//! ```
//!
//! so the content is rotated by `θ` and magnified by `s` about the centre, then displaced, then
//! mirrored. Written out, with `q = (qx, qy)` in (column, row) units:
//! `src_x = c + (qx·cos θ − qy·sin θ)/s`, `src_y = c + (qx·sin θ + qy·cos θ)/s`. The elastic
//! displacement is in output pixels (it is added before the inverse rotation and scaling, as in
//! batchgenerators).
//!
//! * **Rotation** `θ` (degrees, `rotation_deg`) turns the content **counter-clockwise as
//!   displayed** (row 0 at the top, column 0 at the left): at 90° a point right of the centre
//!   moves above it; 90° equals NumPy's `np.rot90(a, 1)` exactly.
//! * **Scale** `s` (`scale`) is the magnification of the content: `s = 2` doubles the size of
//!   organs (zoom in). batchgenerators' factor multiplies the sampling coordinates instead (its
//!   `s > 1` zooms out); as in batchgenerators, when the range straddles 1, half of the draws
//!   are taken from `[lo, 1)` and half from `[1, hi)`.
//! * **Elastic** (Simard et al. 2003, as batchgenerators' `elastic_deform_coordinates`): two
//!   fields of independent U(−1, 1) values per pixel, each smoothed by a Gaussian of `sigma`
//!   pixels (normalised kernel truncated at 4σ as `scipy.ndimage.gaussian_filter`, zero outside
//!   the slice as batchgenerators' `mode="constant"`; separable, so O(size²·σ)), multiplied by
//!   `alpha` pixels. The RMS displacement per axis is about `alpha / (σ·√(12π)) ≈ 0.163·alpha/σ`
//!   pixels away from the borders: alpha 200, σ 9 gives ≈ 3.6 px.
//! * **Mirroring** flips the columns (`mirror_lr_prob`: the patient's left–right axis, since
//!   ctseg's canonical layout has columns towards the patient's left) or the rows
//!   (`mirror_ap_prob`: anterior–posterior). Both default to 0; see below.
//! * **Interpolation**: bilinear for the image (MONAI's default; nnU-Net uses cubic splines). It
//!   never overshoots, so a windowed image stays in [0, 1] through the spatial step, and it is
//!   cheap. Near the border the image blends towards the air value. The label is nearest
//!   neighbour with half-open cells: source `x` belongs to the column `k` with
//!   `x ∈ [k − ½, k + ½)`, i.e. `floor(x) + (frac(x) ≥ ½)`.
//!
//! # Why mirroring is off by default
//!
//! `ctseg prepare` and `ctseg predict` reorient every volume from its affine to one canonical
//! layout (the liver on the image's left, the spine at the bottom), so the network only ever sees
//! that orientation. A left–right flip shows situs inversus (the liver on the patient's left),
//! which almost never occurs (roughly 1 in 10,000 people) and would teach the network to ignore
//! laterality, a cue that is reliable in this layout; an anterior–posterior flip (the spine at
//! the front) is anatomically impossible. nnU-Net mirrors every axis because it does not assume
//! a canonical orientation and uses mirroring at test time as well. Turn mirroring on for data
//! whose orientation is not trustworthy (broken headers) or to measure what laterality is worth.
//! For the same reason the default rotation range is ±15° (patient positioning), not nnU-Net's
//! ±180° for 2-D: a 180° rotation is a left–right plus an anterior–posterior flip.
//!
//! # Intensity conventions
//!
//! The intensity transforms that depend on the image's units get them from [`InputScale`]: the
//! network-input value of air (−1000 HU: the fill for pixels from outside the slice), of water
//! (0 HU: the fixed point of the brightness multiplier) and of one HU (noise is given in HU²).
//! The transforms therefore mean the same anatomy-level change with raw HU and with a window.
//! Air rather than the slice minimum fills the outside because the minimum of a CT slice is often
//! a scanner's padding value (−2048, −3024 HU outside the reconstruction circle) or a noise
//! outlier, while air is what surrounds the patient; it is also the same for every slice.
//!
//! * **Noise**: variance `v ~ U(noise_variance)` in HU², standard deviation `√v` HU, added per
//!   pixel (Marsaglia's polar method, pairs in row-major order). batchgenerators passes its
//!   "variance" to `np.random.normal` as the standard deviation; here it really is a variance.
//! * **Blur**: `σ ~ U(blur_sigma)` pixels, both axes, separable, mirror-padded (scipy's
//!   `reflect`), kernel truncated at 4σ.
//! * **Brightness**: `m ~ U(brightness)`, `x ← water + (x − water)·m` (with raw HU, `x·m`, as
//!   nnU-Net's `BrightnessMultiplicativeTransform`).
//! * **Contrast**: factor `f` drawn two-sided in `contrast` (as scale), `x ← (x − mean)·f + mean`
//!   with the slice mean, then clipped to the slice's [min, max] before the transform
//!   (nnU-Net's `ContrastAugmentationTransform`, `preserve_range`).
//! * **Gamma**: `g` drawn two-sided in `gamma`; with `r = max − min + 1e-7` over the slice,
//!   `x ← ((x − min)/r)^g·r + min`; with `gamma_retain_stats` the slice's mean and
//!   standard deviation are restored afterwards. The inverted variant negates the image before
//!   and after (it bends the bright end instead of the dark end). nnU-Net runs the inverted one
//!   with probability 0.1, then the plain one with 0.3.
//!
//! # Determinism
//!
//! The output depends only on (inputs, config, [`InputScale`], generator state), bit for bit,
//! on every machine: all arithmetic is IEEE `+ − × ÷ √` (Rust never fuses a multiply and an
//! add on its own), `floor`/`round`, casts, and bit-reproducible functions instead of the
//! platform's libm: [`crate::detmath`]'s `exp` (Gaussian kernel weights) and `sin_cos` (rotation,
//! through [`sin_cos_deg`], which reduces in degrees so that multiples of 90° are exact), and this
//! module's [`ln_fast`] / [`exp_fast`] / [`pow_fast`] (noise and gamma: per-pixel calls, written
//! in detmath's style with constant-coefficient polynomials instead of per-term divisions). Sums run in a fixed order; the smoothing
//! loops are vectorised only across pixels, which reorders no sum.
//!
//! The generator handed in is split first: it gives one 64-bit seed to each of the eleven
//! transforms in the order rotation, scale, elastic, mirror_lr, mirror_ap, noise, blur,
//! brightness, contrast, gamma (inverted), gamma, whether they are enabled or not, and each
//! transform draws from its own `Rng::new(seed)`: first its Bernoulli trial, then (when it fires)
//! its parameters, then (elastic, noise) its per-pixel values in row-major order. Enabling or
//! changing one transform therefore never changes what another draws: turning on noise leaves
//! the geometry of every slice as it was.
//!
//! # Example
//!
//! nnU-Net's 2-D probabilities with the CT-specific choices above:
//!
//! ```toml
//! [augment]
//! rotation_prob = 0.2
//! rotation_deg = [-15.0, 15.0]
//! scale_prob = 0.2
//! scale = [0.7, 1.4]
//! noise_prob = 0.1
//! blur_prob = 0.1
//! brightness_prob = 0.15
//! contrast_prob = 0.15
//! gamma_inverted_prob = 0.1
//! gamma_prob = 0.3
//! ```

use serde::{Deserialize, Serialize};

use crate::detmath;
use crate::rng::Rng;

/// The `[augment]` section. Every key has a default, so a config without the section (or with
/// only some keys) parses; all probabilities default to 0, so the default is "no augmentation".
/// The ranges default to nnU-Net's (batchgenerators') values except where CT in a canonical
/// orientation calls for others (rotation, noise units); they only matter once the transform's
/// probability is raised. Each probability is per slice; ranges are `[lo, hi]`, drawn uniformly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Probability of an in-plane rotation about the slice centre. Default 0 (nnU-Net: 0.2).
    pub rotation_prob: f64,
    /// Rotation angle range in degrees, counter-clockwise as displayed. Default [−15, 15].
    pub rotation_deg: [f64; 2],
    /// Probability of isotropic scaling about the slice centre. Default 0 (nnU-Net: 0.2).
    pub scale_prob: f64,
    /// Magnification range (2 = twice as large). Default [0.7, 1.4] (nnU-Net's).
    pub scale: [f64; 2],
    /// Probability of an elastic deformation. Default 0 (nnU-Net v2: 0).
    pub elastic_prob: f64,
    /// Elastic magnitude alpha in pixels (multiplies the smoothed U(−1, 1) field). Default
    /// [0, 200] (batchgenerators').
    pub elastic_alpha: [f64; 2],
    /// Elastic smoothness sigma in pixels. Default [9, 13] (batchgenerators').
    pub elastic_sigma: [f64; 2],
    /// Probability of mirroring the columns (patient's left ↔ right). Default 0: see the module
    /// docs.
    pub mirror_lr_prob: f64,
    /// Probability of mirroring the rows (anterior ↔ posterior). Default 0: see the module docs.
    pub mirror_ap_prob: f64,
    /// Probability of additive Gaussian noise. Default 0 (nnU-Net: 0.1).
    pub noise_prob: f64,
    /// Noise variance range in HU². Default [0, 100] (standard deviation up to 10 HU).
    pub noise_variance: [f64; 2],
    /// Probability of a Gaussian blur. Default 0 (nnU-Net: 0.2 × 0.5 per channel = 0.1).
    pub blur_prob: f64,
    /// Blur sigma range in pixels. Default [0.5, 1.0] (nnU-Net's).
    pub blur_sigma: [f64; 2],
    /// Probability of a brightness multiplier. Default 0 (nnU-Net: 0.15).
    pub brightness_prob: f64,
    /// Brightness multiplier range (about water, 0 HU). Default [0.75, 1.25] (nnU-Net's).
    pub brightness: [f64; 2],
    /// Probability of a contrast change. Default 0 (nnU-Net: 0.15).
    pub contrast_prob: f64,
    /// Contrast factor range (about the slice mean, clipped to the slice range). Default
    /// [0.75, 1.25] (nnU-Net's).
    pub contrast: [f64; 2],
    /// Probability of gamma on the inverted image (applied first). Default 0 (nnU-Net: 0.1).
    pub gamma_inverted_prob: f64,
    /// Probability of gamma on the image (applied second). Default 0 (nnU-Net: 0.3).
    pub gamma_prob: f64,
    /// Gamma range, shared by both gamma transforms. Default [0.7, 1.5] (nnU-Net's).
    pub gamma: [f64; 2],
    /// Restore the slice's mean and standard deviation after gamma. Default true (nnU-Net's).
    pub gamma_retain_stats: bool,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            rotation_prob: 0.0,
            rotation_deg: [-15.0, 15.0],
            scale_prob: 0.0,
            scale: [0.7, 1.4],
            elastic_prob: 0.0,
            elastic_alpha: [0.0, 200.0],
            elastic_sigma: [9.0, 13.0],
            mirror_lr_prob: 0.0,
            mirror_ap_prob: 0.0,
            noise_prob: 0.0,
            noise_variance: [0.0, 100.0],
            blur_prob: 0.0,
            blur_sigma: [0.5, 1.0],
            brightness_prob: 0.0,
            brightness: [0.75, 1.25],
            contrast_prob: 0.0,
            contrast: [0.75, 1.25],
            gamma_inverted_prob: 0.0,
            gamma_prob: 0.0,
            gamma: [0.7, 1.5],
            gamma_retain_stats: true,
        }
    }
}

/// A config value out of range: the same fields as ctseg's `Error::ConfigValue`, into which
/// `RunConfig::validate` converts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AugmentConfigError {
    /// The config file (or "built-in quick config" / "command line").
    pub source_name: String,
    /// The dotted key, e.g. `augment.rotation_deg`.
    pub field: String,
    /// What was expected.
    pub message: String,
}

impl std::fmt::Display for AugmentConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "config {}: `{}` {}",
            self.source_name, self.field, self.message
        )
    }
}

impl std::error::Error for AugmentConfigError {}

/// Largest accepted elastic sigma in pixels (the kernel has 8σ + 1 taps).
pub const MAX_ELASTIC_SIGMA: f64 = 256.0;
/// Largest accepted blur sigma in pixels.
pub const MAX_BLUR_SIGMA: f64 = 32.0;

/// Which side of a range must be strictly positive / non-negative, for [`AugmentConfig::validate`].
#[derive(Clone, Copy)]
enum Lower {
    Any,
    NonNegative,
    Positive,
}

impl AugmentConfig {
    /// The probabilities with their field names, in the order the transforms run.
    fn probabilities(&self) -> [(&'static str, f64); 11] {
        [
            ("rotation_prob", self.rotation_prob),
            ("scale_prob", self.scale_prob),
            ("elastic_prob", self.elastic_prob),
            ("mirror_lr_prob", self.mirror_lr_prob),
            ("mirror_ap_prob", self.mirror_ap_prob),
            ("noise_prob", self.noise_prob),
            ("blur_prob", self.blur_prob),
            ("brightness_prob", self.brightness_prob),
            ("contrast_prob", self.contrast_prob),
            ("gamma_inverted_prob", self.gamma_inverted_prob),
            ("gamma_prob", self.gamma_prob),
        ]
    }

    /// True when any transform can fire (any probability > 0).
    pub fn enabled(&self) -> bool {
        self.probabilities().iter().any(|&(_, p)| p > 0.0)
    }

    /// Checks the values; `source` names the config in the error, whose `field` is the dotted
    /// key (`augment.rotation_deg`). Ranges are checked whether or not their probability is 0,
    /// so a config stays valid when a probability is raised on the command line.
    pub fn validate(&self, source: &str) -> Result<(), AugmentConfigError> {
        let bad = |field: &str, message: String| AugmentConfigError {
            source_name: source.to_string(),
            field: format!("augment.{field}"),
            message,
        };
        for (field, p) in self.probabilities() {
            if !(0.0..=1.0).contains(&p) {
                return Err(bad(field, format!("must be in [0, 1], got {p}")));
            }
        }
        let range = |field: &str, r: [f64; 2], lower: Lower, max: f64| {
            let [lo, hi] = r;
            if !lo.is_finite() || !hi.is_finite() {
                return Err(bad(field, format!("must be finite, got {r:?}")));
            }
            if lo > hi {
                return Err(bad(
                    field,
                    format!("must be [lo, hi] with lo <= hi, got {r:?}"),
                ));
            }
            match lower {
                Lower::Positive if lo <= 0.0 => {
                    return Err(bad(field, format!("must be > 0, got {r:?}")));
                }
                Lower::NonNegative if lo < 0.0 => {
                    return Err(bad(field, format!("must be >= 0, got {r:?}")));
                }
                _ => {}
            }
            if hi > max {
                return Err(bad(field, format!("must be <= {max}, got {r:?}")));
            }
            Ok(())
        };
        if self.rotation_deg[0] < -180.0 {
            return Err(bad(
                "rotation_deg",
                format!("must lie in [-180, 180], got {:?}", self.rotation_deg),
            ));
        }
        range("rotation_deg", self.rotation_deg, Lower::Any, 180.0)?;
        range("scale", self.scale, Lower::Positive, 100.0)?;
        range(
            "elastic_alpha",
            self.elastic_alpha,
            Lower::NonNegative,
            f64::MAX,
        )?;
        range(
            "elastic_sigma",
            self.elastic_sigma,
            Lower::Positive,
            MAX_ELASTIC_SIGMA,
        )?;
        range(
            "noise_variance",
            self.noise_variance,
            Lower::NonNegative,
            f64::MAX,
        )?;
        range(
            "blur_sigma",
            self.blur_sigma,
            Lower::Positive,
            MAX_BLUR_SIGMA,
        )?;
        range("brightness", self.brightness, Lower::Positive, f64::MAX)?;
        range("contrast", self.contrast, Lower::Positive, f64::MAX)?;
        range("gamma", self.gamma, Lower::Positive, f64::MAX)?;
        Ok(())
    }
}

/// What the network-input values of a few HU are, for the transforms that depend on units.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InputScale {
    /// The input value of air (−1000 HU): fills image pixels sampled from outside the slice.
    pub air: f32,
    /// The input value of water (0 HU): the fixed point of the brightness multiplier.
    pub water: f32,
    /// Input units per HU: noise variances in HU² are multiplied by its square.
    pub per_hu: f32,
}

impl InputScale {
    /// `intensity = "raw"`: the input is HU.
    pub fn raw() -> Self {
        Self {
            air: -1000.0,
            water: 0.0,
            per_hu: 1.0,
        }
    }

    /// `intensity = "window"` with `window = [lo, hi]`: HU clipped to [lo, hi] and mapped to
    /// [0, 1], the same expression as `DataConfig::transform`.
    pub fn window(lo: f64, hi: f64) -> Self {
        let t = |hu: f64| ((hu.clamp(lo, hi) - lo) / (hi - lo)) as f32;
        Self {
            air: t(-1000.0),
            water: t(0.0),
            per_hu: (1.0 / (hi - lo)) as f32,
        }
    }
}

/// What [`augment_slice`] did to one slice (`None`/`false`: the transform did not fire).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Applied {
    /// Rotation angle in degrees.
    pub rotation_deg: Option<f64>,
    /// Magnification.
    pub scale: Option<f64>,
    /// Elastic (alpha, sigma) in pixels.
    pub elastic: Option<(f64, f64)>,
    /// Columns mirrored.
    pub mirror_lr: bool,
    /// Rows mirrored.
    pub mirror_ap: bool,
    /// Noise standard deviation in HU.
    pub noise_std_hu: Option<f64>,
    /// Blur sigma in pixels.
    pub blur_sigma: Option<f64>,
    /// Brightness multiplier.
    pub brightness: Option<f64>,
    /// Contrast factor.
    pub contrast: Option<f64>,
    /// Gamma applied to the inverted image.
    pub gamma_inverted: Option<f64>,
    /// Gamma applied to the image.
    pub gamma: Option<f64>,
}

impl Applied {
    /// True when a spatial transform fired (the slice was resampled).
    pub fn spatial(&self) -> bool {
        self.rotation_deg.is_some()
            || self.scale.is_some()
            || self.elastic.is_some()
            || self.mirror_lr
            || self.mirror_ap
    }
}

/// The transforms, in the order they draw their seeds from the caller's generator.
#[derive(Clone, Copy)]
enum Slot {
    Rotation,
    Scale,
    Elastic,
    MirrorLr,
    MirrorAp,
    Noise,
    Blur,
    Brightness,
    Contrast,
    GammaInverted,
    Gamma,
}
const SLOTS: usize = 11;

/// One slice to augment: its image (after the intensity transform) and labels, `size × size`,
/// row-major.
#[derive(Clone, Copy)]
pub struct SliceRef<'a> {
    /// Network-input values.
    pub image: &'a [f32],
    /// Labels 0, 1, 2.
    pub label: &'a [u8],
    /// Side length.
    pub size: usize,
}

/// Where the augmented slice goes (`size²` values each).
pub struct SliceOut<'a> {
    /// The augmented image.
    pub image: &'a mut [f32],
    /// The augmented labels.
    pub label: &'a mut [u8],
}

/// Augments one `size × size` slice (row-major `image`, already intensity-transformed, and its
/// `label`) into `out`, drawing from `rng` as described in the module docs;
/// `units` gives the input values of air, water and one HU for the intensity transform in use.
/// Returns what was applied. With `cfg.enabled() == false` the output is the input, bit for bit.
///
/// # Panics
/// When a buffer is not `size²` long.
pub fn augment_slice(
    input: SliceRef,
    cfg: &AugmentConfig,
    units: &InputScale,
    rng: &mut Rng,
    out: SliceOut,
) -> Applied {
    let px = input.size * input.size;
    assert_eq!(input.image.len(), px, "augment_slice: image is not size²");
    assert_eq!(input.label.len(), px, "augment_slice: label is not size²");
    assert_eq!(out.image.len(), px, "augment_slice: out_image is not size²");
    assert_eq!(out.label.len(), px, "augment_slice: out_label is not size²");
    // 1. One seed per transform from the caller's generator, always all of them, so that
    //    enabling one transform does not change what another draws.
    let seeds = Seeds::draw(rng);
    let mut applied = Applied::default();
    let mut scratch = Scratch::default();
    // 2. The spatial transforms' parameters (and the elastic displacement field).
    let field = spatial_parameters(cfg, &seeds, input.size, &mut applied, &mut scratch);
    // 3. All of them as one sampling map.
    resample(
        input,
        &applied,
        field.as_ref(),
        units.air,
        out.image,
        out.label,
    );
    // 4. The intensity transforms, image only.
    intensity(
        out.image,
        input.size,
        cfg,
        units,
        &seeds,
        &mut applied,
        &mut scratch,
    );
    applied
}

/// Each transform's seed, drawn in [`Slot`] order.
struct Seeds([u64; SLOTS]);

impl Seeds {
    fn draw(rng: &mut Rng) -> Self {
        let mut seeds = [0u64; SLOTS];
        for s in seeds.iter_mut() {
            *s = rng.next_u64();
        }
        Seeds(seeds)
    }

    /// The generator of one transform.
    fn rng(&self, slot: Slot) -> Rng {
        Rng::new(self.0[slot as usize])
    }
}

/// An elastic displacement field: x and y offsets in pixels, one per output pixel.
type Field = (Vec<f32>, Vec<f32>);

/// Draws which spatial transforms fire and their parameters into `applied`; returns the elastic
/// displacement field when it fires.
fn spatial_parameters(
    cfg: &AugmentConfig,
    seeds: &Seeds,
    size: usize,
    applied: &mut Applied,
    scratch: &mut Scratch,
) -> Option<Field> {
    let mut r = seeds.rng(Slot::Rotation);
    if r.bernoulli(cfg.rotation_prob) {
        applied.rotation_deg = Some(r.range(cfg.rotation_deg[0], cfg.rotation_deg[1]));
    }
    let mut r = seeds.rng(Slot::Scale);
    if r.bernoulli(cfg.scale_prob) {
        applied.scale = Some(two_sided(&mut r, cfg.scale));
    }
    let mut field = None;
    let mut r = seeds.rng(Slot::Elastic);
    if r.bernoulli(cfg.elastic_prob) {
        let alpha = r.range(cfg.elastic_alpha[0], cfg.elastic_alpha[1]);
        let sigma = r.range(cfg.elastic_sigma[0], cfg.elastic_sigma[1]);
        applied.elastic = Some((alpha, sigma));
        let kernel = gaussian_kernel(sigma);
        let mut one_field = |r: &mut Rng| {
            let mut f: Vec<f32> = (0..size * size)
                .map(|_| (2.0 * r.uniform() - 1.0) as f32)
                .collect();
            smooth(&mut f, size, &kernel, Edge::Zero, scratch);
            let a = alpha as f32;
            f.iter_mut().for_each(|v| *v *= a);
            f
        };
        let fx = one_field(&mut r);
        let fy = one_field(&mut r);
        field = Some((fx, fy));
    }
    applied.mirror_lr = seeds.rng(Slot::MirrorLr).bernoulli(cfg.mirror_lr_prob);
    applied.mirror_ap = seeds.rng(Slot::MirrorAp).bernoulli(cfg.mirror_ap_prob);
    field
}

/// Writes `input` resampled through every spatial transform in `applied` (one sampling map:
/// mirror, elastic offset, then rotation and scale about the centre) into the outputs; image
/// pixels sampled from outside the slice are `air`.
fn resample(
    input: SliceRef,
    applied: &Applied,
    field: Option<&Field>,
    air: f32,
    out_image: &mut [f32],
    out_label: &mut [u8],
) {
    let SliceRef { image, label, size } = input;
    let only_mirrored =
        applied.rotation_deg.is_none() && applied.scale.is_none() && field.is_none();
    if !applied.spatial() {
        out_image.copy_from_slice(image);
        out_label.copy_from_slice(label);
    } else if only_mirrored {
        // The map below pulls every pixel back to exactly its mirror image, a pixel centre,
        // where the bilinear and nearest samples are that pixel: the same as this index flip.
        for y in 0..size {
            let sy = if applied.mirror_ap { size - 1 - y } else { y };
            for x in 0..size {
                let sx = if applied.mirror_lr { size - 1 - x } else { x };
                out_image[y * size + x] = image[sy * size + sx];
                out_label[y * size + x] = label[sy * size + sx];
            }
        }
    } else {
        let (sin, cos) = applied.rotation_deg.map_or((0.0, 1.0), sin_cos_deg);
        let s = applied.scale.unwrap_or(1.0);
        let (a11, a12, a21, a22) = (cos / s, -sin / s, sin / s, cos / s);
        let mx = if applied.mirror_lr { -1.0 } else { 1.0 };
        let my = if applied.mirror_ap { -1.0 } else { 1.0 };
        let c = (size as f64 - 1.0) / 2.0;
        for y in 0..size {
            let dy = my * (y as f64 - c);
            for x in 0..size {
                let i = y * size + x;
                let mut qx = mx * (x as f64 - c);
                let mut qy = dy;
                if let Some((fx, fy)) = field {
                    qx += fx[i] as f64;
                    qy += fy[i] as f64;
                }
                let sx = c + (a11 * qx + a12 * qy);
                let sy = c + (a21 * qx + a22 * qy);
                (out_image[i], out_label[i]) = sample(image, label, size, sx, sy, air);
            }
        }
    }
}

/// The intensity transforms on the image, each drawing whether it fires and its parameter into
/// `applied`: noise, blur, brightness, contrast, inverted gamma, gamma.
fn intensity(
    img: &mut [f32],
    size: usize,
    cfg: &AugmentConfig,
    units: &InputScale,
    seeds: &Seeds,
    applied: &mut Applied,
    scratch: &mut Scratch,
) {
    let mut r = seeds.rng(Slot::Noise);
    if r.bernoulli(cfg.noise_prob) {
        let variance = r.range(cfg.noise_variance[0], cfg.noise_variance[1]);
        let std_hu = variance.sqrt();
        applied.noise_std_hu = Some(std_hu);
        let std = std_hu * units.per_hu as f64;
        for pair in img.chunks_mut(2) {
            let (z0, z1) = normal_pair(&mut r);
            pair[0] = (pair[0] as f64 + std * z0) as f32;
            if let Some(v) = pair.get_mut(1) {
                *v = (*v as f64 + std * z1) as f32;
            }
        }
    }
    let mut r = seeds.rng(Slot::Blur);
    if r.bernoulli(cfg.blur_prob) {
        let sigma = r.range(cfg.blur_sigma[0], cfg.blur_sigma[1]);
        applied.blur_sigma = Some(sigma);
        smooth(img, size, &gaussian_kernel(sigma), Edge::Reflect, scratch);
    }
    let mut r = seeds.rng(Slot::Brightness);
    if r.bernoulli(cfg.brightness_prob) {
        let m = r.range(cfg.brightness[0], cfg.brightness[1]);
        applied.brightness = Some(m);
        let w = units.water as f64;
        img.iter_mut()
            .for_each(|v| *v = (w + (*v as f64 - w) * m) as f32);
    }
    let mut r = seeds.rng(Slot::Contrast);
    if r.bernoulli(cfg.contrast_prob) {
        let f = two_sided(&mut r, cfg.contrast);
        applied.contrast = Some(f);
        let st = Stats::of(img);
        img.iter_mut()
            .for_each(|v| *v = ((*v as f64 - st.mean) * f + st.mean).clamp(st.min, st.max) as f32);
    }
    let mut r = seeds.rng(Slot::GammaInverted);
    if r.bernoulli(cfg.gamma_inverted_prob) {
        let g = two_sided(&mut r, cfg.gamma);
        applied.gamma_inverted = Some(g);
        gamma(img, g, true, cfg.gamma_retain_stats);
    }
    let mut r = seeds.rng(Slot::Gamma);
    if r.bernoulli(cfg.gamma_prob) {
        let g = two_sided(&mut r, cfg.gamma);
        applied.gamma = Some(g);
        gamma(img, g, false, cfg.gamma_retain_stats);
    }
}

/// A factor drawn as batchgenerators draws scale, contrast and gamma: when the range straddles
/// 1, half the time from `[lo, 1)` and half from `[1, hi)`, so shrinking and growing are equally
/// likely; otherwise uniformly from `[lo, hi)`.
fn two_sided(r: &mut Rng, [lo, hi]: [f64; 2]) -> f64 {
    if lo < 1.0 && hi > 1.0 {
        if r.bernoulli(0.5) {
            r.range(lo, 1.0)
        } else {
            r.range(1.0, hi)
        }
    } else {
        r.range(lo, hi)
    }
}

/// (sin, cos) of an angle in degrees, with the quadrant reduced in degrees so that multiples of
/// 90° give exact 0 and ±1 (a candidate for `detmath`).
pub fn sin_cos_deg(deg: f64) -> (f64, f64) {
    let q = (deg / 90.0).round();
    let rest = deg - q * 90.0;
    let (s, c) = detmath::sin_cos(rest * (std::f64::consts::PI / 180.0));
    match (q as i64).rem_euclid(4) {
        0 => (s, c),
        1 => (c, -s),
        2 => (-s, -c),
        _ => (-c, s),
    }
}

/// ln x for finite x > 0 from IEEE `+ − × ÷` only, in detmath's style (same reduction as
/// `detmath::ln`: x = m·2^e, m ∈ [√½, √2), ln m = 2·atanh(s), s = (m − 1)/(m + 1)) but with the
/// atanh series as an 11-term Horner polynomial in s² with constant coefficients, so it costs
/// one division instead of twenty. Truncation error < s²²/23 < 1e-18 for |s| ≤ 0.172; within
/// 2 ulp of libm (tested). −∞ for 0, NaN below 0. A candidate for `detmath`.
pub fn ln_fast(x: f64) -> f64 {
    /// 1/(2k+1), k = 0..=10 (IEEE division at compile time: the same bits on every machine).
    const ODD: [f64; 11] = {
        let mut a = [0.0; 11];
        let mut k = 0;
        while k < 11 {
            a[k] = 1.0 / (2 * k + 1) as f64;
            k += 1;
        }
        a
    };
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    if x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return f64::NEG_INFINITY;
    }
    if x.is_infinite() {
        return x;
    }
    let mut x = x;
    let mut e: i64 = 0;
    if x < f64::MIN_POSITIVE {
        x *= f64::from_bits(((60 + 1023) as u64) << 52); // 2^60: subnormals
        e -= 60;
    }
    let bits = x.to_bits();
    e += ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | (1023u64 << 52));
    if m > std::f64::consts::SQRT_2 {
        m /= 2.0;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    let mut p = ODD[10];
    for k in (0..10).rev() {
        p = p * z + ODD[k];
    }
    let e = e as f64;
    e * LN2_HI + (2.0 * s * p + e * LN2_LO)
}

/// e^y from IEEE `+ − × ÷` only, in detmath's style (same reduction as `detmath::exp`:
/// y = k·ln2 + r, |r| ≤ ln2/2, ln2 split as fdlibm's Cody–Waite constants) with the Taylor
/// series of e^r as a degree-14 Horner polynomial with constant coefficients 1/n! (error
/// < 0.35¹⁵/15! < 1e-18), so it needs no division. Within 2 ulp of libm (tested). A candidate
/// for `detmath`.
pub fn exp_fast(y: f64) -> f64 {
    /// 1/n!, n = 0..=14 (computed at compile time).
    const INV_FACT: [f64; 15] = {
        let mut a = [1.0; 15];
        let mut n = 1;
        while n < 15 {
            a[n] = a[n - 1] / n as f64;
            n += 1;
        }
        a
    };
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    if y.is_nan() {
        return y;
    }
    if y > 709.0 {
        return f64::INFINITY;
    }
    if y < -745.0 {
        return 0.0;
    }
    // k = y/ln2 rounded to the nearest integer (ties to even) by the 1.5·2^52 shift: exact IEEE
    // arithmetic for |y/ln2| < 2^51, no libm call.
    const SHIFT: f64 = 6_755_399_441_055_744.0;
    let k = (y * std::f64::consts::LOG2_E + SHIFT) - SHIFT;
    let r = (y - k * LN2_HI) - k * LN2_LO;
    let mut p = INV_FACT[14];
    for n in (0..14).rev() {
        p = p * r + INV_FACT[n];
    }
    let pow2 = |k: i64| f64::from_bits(((k.clamp(-1022, 1023) + 1023) as u64) << 52);
    let k = k as i64;
    if k < -1022 {
        p * pow2(k + 600) * pow2(-600)
    } else {
        p * pow2(k)
    }
}

/// x^g for x ≥ 0, g > 0 as `exp_fast(g·ln_fast(x))` (0 for x ≤ 0). Relative error about
/// (2 + |g·ln x|)·1e-16: for gamma's x ∈ [1e-7, 1], g ≤ 10, below 2e-14. A candidate for
/// `detmath`.
pub fn pow_fast(x: f64, g: f64) -> f64 {
    if x <= 0.0 {
        0.0
    } else {
        exp_fast(g * ln_fast(x))
    }
}

/// Two independent standard normal deviates by Marsaglia's polar method: (u, v) uniform in the
/// unit disc (pairs outside it, or at its centre, are drawn again), then
/// (u, v)·√(−2 ln s / s) with s = u² + v². No trigonometry; ~1.27 pairs of uniforms per pair.
fn normal_pair(r: &mut Rng) -> (f64, f64) {
    loop {
        let u = 2.0 * r.uniform() - 1.0;
        let v = 2.0 * r.uniform() - 1.0;
        let s = u * u + v * v;
        if s > 0.0 && s < 1.0 {
            let f = (-2.0 * ln_fast(s) / s).sqrt();
            return (u * f, v * f);
        }
    }
}

/// Bilinear interpolation between four values (x then y), in f64.
#[inline]
fn lerp2(v00: f64, v01: f64, v10: f64, v11: f64, fx: f64, fy: f64) -> f32 {
    let top = v00 + (v01 - v00) * fx;
    let bottom = v10 + (v11 - v10) * fx;
    (top + (bottom - top) * fy) as f32
}

/// Samples the image bilinearly and the label by nearest neighbour at the point (x, y) (pixel
/// centres at integers). Image neighbours outside the slice take `bg`; a label whose nearest
/// pixel is outside is 0. The nearest pixel is the one whose half-open cell [k − ½, k + ½) holds
/// the point: column `floor(x) + (frac(x) ≥ ½)`, likewise the row. On a pixel centre the image
/// value is that pixel's, bit for bit.
#[inline]
fn sample(img: &[f32], lab: &[u8], n: usize, x: f64, y: f64, bg: f32) -> (f32, u8) {
    let x0 = x.floor();
    let y0 = y.floor();
    let nf = n as f64;
    // All four neighbours outside (also catches NaN).
    if !(x0 >= -1.0 && x0 < nf && y0 >= -1.0 && y0 < nf) {
        return (bg, 0);
    }
    let (fx, fy) = (x - x0, y - y0);
    let (xi, yi) = (x0 as isize, y0 as isize);
    let inside =
        |xx: isize, yy: isize| xx >= 0 && yy >= 0 && (xx as usize) < n && (yy as usize) < n;
    let (xn, yn) = (xi + (fx >= 0.5) as isize, yi + (fy >= 0.5) as isize);
    let label = if inside(xn, yn) {
        lab[yn as usize * n + xn as usize]
    } else {
        0
    };
    if xi >= 0 && yi >= 0 && (xi as usize) + 1 < n && (yi as usize) + 1 < n {
        // Interior: all four neighbours inside.
        let i = yi as usize * n + xi as usize;
        if fx == 0.0 && fy == 0.0 {
            return (img[i], label);
        }
        let v = |j: usize| img[j] as f64;
        return (lerp2(v(i), v(i + 1), v(i + n), v(i + n + 1), fx, fy), label);
    }
    let at = |xx: isize, yy: isize| -> f64 {
        if inside(xx, yy) {
            img[yy as usize * n + xx as usize] as f64
        } else {
            bg as f64
        }
    };
    if fx == 0.0 && fy == 0.0 {
        return (at(xi, yi) as f32, label);
    }
    let image = lerp2(
        at(xi, yi),
        at(xi + 1, yi),
        at(xi, yi + 1),
        at(xi + 1, yi + 1),
        fx,
        fy,
    );
    (image, label)
}

/// Mean (f64, summed in index order), min and max of a slice.
struct Stats {
    mean: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn of(v: &[f32]) -> Self {
        let mut sum = 0.0f64;
        let mut min = f64::INFINITY;
        let mut max = f64::NEG_INFINITY;
        for &x in v {
            let x = x as f64;
            sum += x;
            min = min.min(x);
            max = max.max(x);
        }
        Self {
            mean: sum / v.len().max(1) as f64,
            min,
            max,
        }
    }
}

/// Population standard deviation about `mean` (summed in index order).
fn std_about(v: &[f64], mean: f64) -> f64 {
    let mut ss = 0.0f64;
    for &x in v {
        ss += (x - mean) * (x - mean);
    }
    (ss / v.len().max(1) as f64).sqrt()
}

/// batchgenerators' `augment_gamma` on one slice (the current version's order of the
/// retain-stats steps: centre, rescale, add the mean back).
fn gamma(img: &mut [f32], g: f64, invert: bool, retain_stats: bool) {
    const EPS: f64 = 1e-7;
    let sign = if invert { -1.0 } else { 1.0 };
    let mut x: Vec<f64> = img.iter().map(|&v| sign * v as f64).collect();
    let n = x.len().max(1) as f64;
    let mean0 = x.iter().sum::<f64>() / n;
    let sd0 = std_about(&x, mean0);
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    for &v in &x {
        min = min.min(v);
        max = max.max(v);
    }
    let range = max - min + EPS;
    for v in x.iter_mut() {
        *v = pow_fast((*v - min) / range, g) * range + min;
    }
    if retain_stats {
        let mean1 = x.iter().sum::<f64>() / n;
        let sd1 = std_about(&x, mean1);
        for v in x.iter_mut() {
            *v = (*v - mean1) / (sd1 + 1e-8) * sd0 + mean0;
        }
    }
    for (o, v) in img.iter_mut().zip(&x) {
        *o = (sign * v) as f32;
    }
}

/// How a smoothing pass treats pixels beyond the slice edge.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Edge {
    /// Zero (scipy `mode="constant"`, `cval=0`): the elastic field.
    Zero,
    /// Mirrored about the edge, `d c b a | a b c d | d c b a` (scipy `mode="reflect"`): the blur.
    Reflect,
}

/// Reusable buffers for [`smooth`].
#[derive(Default)]
struct Scratch {
    tmp: Vec<f32>,
    pad: Vec<f32>,
}

/// Normalised Gaussian kernel of `sigma` pixels with radius `floor(4σ + 0.5)` (scipy's
/// `gaussian_filter` with `truncate = 4`), weights from detmath's `exp`.
fn gaussian_kernel(sigma: f64) -> Vec<f32> {
    let radius = (4.0 * sigma + 0.5) as usize;
    let w: Vec<f64> = (0..=2 * radius)
        .map(|i| {
            let x = i as f64 - radius as f64;
            detmath::exp(-0.5 * x * x / (sigma * sigma))
        })
        .collect();
    let mut sum = 0.0f64;
    for &v in &w {
        sum += v;
    }
    w.iter().map(|&v| (v / sum) as f32).collect()
}

/// Index `i` reflected into `[0, n)` as scipy's `reflect` mode (period 2n).
fn reflect(i: isize, n: usize) -> usize {
    let m = i.rem_euclid(2 * n as isize) as usize;
    if m < n { m } else { 2 * n - 1 - m }
}

/// Separable convolution of the `n × n` image `buf` with `kernel` along columns then rows, in
/// place. Each output is Σ_t k[t]·in[·+t] summed in tap order; the inner loops run over
/// contiguous pixels (vectorisable without reordering any sum).
fn smooth(buf: &mut [f32], n: usize, kernel: &[f32], edge: Edge, s: &mut Scratch) {
    let radius = kernel.len() / 2;
    s.tmp.clear();
    s.tmp.resize(n * n, 0.0);
    for r in 0..n {
        let out = &mut s.tmp[r * n..(r + 1) * n];
        for (k, &w) in kernel.iter().enumerate() {
            let rr = r as isize + k as isize - radius as isize;
            let src = match edge {
                Edge::Zero if rr < 0 || rr >= n as isize => continue,
                Edge::Zero => rr as usize,
                Edge::Reflect => reflect(rr, n),
            };
            let row = &buf[src * n..(src + 1) * n];
            for (o, &v) in out.iter_mut().zip(row) {
                *o += w * v;
            }
        }
    }
    s.pad.clear();
    s.pad.resize(n + 2 * radius, 0.0);
    for r in 0..n {
        let row = &s.tmp[r * n..(r + 1) * n];
        for (i, p) in s.pad.iter_mut().enumerate() {
            let c = i as isize - radius as isize;
            *p = match edge {
                Edge::Zero if c < 0 || c >= n as isize => 0.0,
                Edge::Zero => row[c as usize],
                Edge::Reflect => row[reflect(c, n)],
            };
        }
        let out = &mut buf[r * n..(r + 1) * n];
        out.fill(0.0);
        for (k, &w) in kernel.iter().enumerate() {
            for (o, &v) in out.iter_mut().zip(&s.pad[k..k + n]) {
                *o += w * v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::keys;

    /// A config with every probability 0 and the given changes.
    fn off() -> AugmentConfig {
        AugmentConfig::default()
    }

    /// Runs [`augment_slice`] into new buffers.
    fn run(
        image: &[f32],
        label: &[u8],
        n: usize,
        cfg: &AugmentConfig,
        scale: &InputScale,
        rng: &mut Rng,
    ) -> (Vec<f32>, Vec<u8>, Applied) {
        let mut oi = vec![f32::NAN; n * n];
        let mut ol = vec![255u8; n * n];
        let input = SliceRef {
            image,
            label,
            size: n,
        };
        let out = SliceOut {
            image: &mut oi,
            label: &mut ol,
        };
        let a = augment_slice(input, cfg, scale, rng, out);
        (oi, ol, a)
    }

    /// A slice with structure everywhere: HU-like image values, all three labels, asymmetric.
    fn test_slice(n: usize, seed: u64) -> (Vec<f32>, Vec<u8>) {
        let mut r = Rng::new(seed);
        let mut img = vec![0.0f32; n * n];
        let mut lab = vec![0u8; n * n];
        for y in 0..n {
            for x in 0..n {
                let i = y * n + x;
                let (fx, fy) = (x as f64 / n as f64, y as f64 / n as f64);
                // "liver": a disc on the image's left, "tumour" inside it
                let d = ((fx - 0.3) * (fx - 0.3) + (fy - 0.45) * (fy - 0.45)).sqrt();
                lab[i] = if d < 0.08 {
                    2
                } else if d < 0.2 {
                    1
                } else {
                    0
                };
                img[i] = (-1000.0 + 1100.0 * fx + 300.0 * fy * fy + 40.0 * r.normal()) as f32;
            }
        }
        (img, lab)
    }

    /// Every transform with probability 1 (mirroring too), default ranges.
    fn all_on() -> AugmentConfig {
        AugmentConfig {
            rotation_prob: 1.0,
            scale_prob: 1.0,
            elastic_prob: 1.0,
            mirror_lr_prob: 1.0,
            mirror_ap_prob: 1.0,
            noise_prob: 1.0,
            blur_prob: 1.0,
            brightness_prob: 1.0,
            contrast_prob: 1.0,
            gamma_inverted_prob: 1.0,
            gamma_prob: 1.0,
            ..AugmentConfig::default()
        }
    }

    /// A random valid config: each probability 0, 1 or in between, ranges drawn inside the
    /// validated bounds.
    fn random_config(r: &mut Rng) -> AugmentConfig {
        let mut p = || match r.below(3) {
            0 => 0.0,
            1 => 1.0,
            _ => r.uniform(),
        };
        let mut c = AugmentConfig {
            rotation_prob: p(),
            scale_prob: p(),
            elastic_prob: p(),
            mirror_lr_prob: p(),
            mirror_ap_prob: p(),
            noise_prob: p(),
            blur_prob: p(),
            brightness_prob: p(),
            contrast_prob: p(),
            gamma_inverted_prob: p(),
            gamma_prob: p(),
            gamma_retain_stats: r.bernoulli(0.5),
            ..AugmentConfig::default()
        };
        let mut span = |lo: f64, hi: f64| {
            let a = r.range(lo, hi);
            let b = r.range(lo, hi);
            [a.min(b), a.max(b)]
        };
        c.rotation_deg = span(-180.0, 180.0);
        c.scale = span(0.3, 3.0);
        c.elastic_alpha = span(0.0, 600.0);
        c.elastic_sigma = span(2.0, 14.0);
        c.noise_variance = span(0.0, 400.0);
        c.blur_sigma = span(0.3, 2.0);
        c.brightness = span(0.5, 1.5);
        c.contrast = span(0.5, 1.5);
        c.gamma = span(0.5, 2.0);
        assert!(c.validate("test").is_ok());
        c
    }

    // ---- config ----------------------------------------------------------------------------

    #[test]
    fn missing_section_and_keys_mean_off() {
        // A run config without [augment] deserialises the section with `#[serde(default)]`, i.e.
        // AugmentConfig::default(); an empty or partial section fills the rest from the same
        // defaults. Default: every probability 0, so enabled() is false.
        #[derive(Deserialize)]
        struct Run {
            #[allow(dead_code)]
            seed: u64,
            #[serde(default)]
            augment: AugmentConfig,
        }
        let old: Run = toml::from_str("seed = 1\n").expect("old config");
        assert_eq!(old.augment, AugmentConfig::default());
        assert!(!old.augment.enabled());
        let partial: Run =
            toml::from_str("seed = 1\n[augment]\nrotation_prob = 0.2\nrotation_deg = [-10, 10]\n")
                .expect("partial section");
        assert_eq!(partial.augment.rotation_prob, 0.2);
        assert_eq!(partial.augment.rotation_deg, [-10.0, 10.0]);
        assert_eq!(
            partial.augment.scale,
            [0.7, 1.4],
            "unset keys keep defaults"
        );
        assert!(partial.augment.enabled());
        assert!(AugmentConfig::default().validate("defaults").is_ok());
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        // deny_unknown_fields: a misspelt key must not be silently ignored.
        let err = toml::from_str::<AugmentConfig>("rotaton_prob = 0.5\n")
            .expect_err("unknown key accepted");
        assert!(err.to_string().contains("rotaton_prob"), "{err}");
    }

    #[test]
    fn config_round_trips_through_toml() {
        // config.resolved.toml writes the section back; reading it gives the same config.
        let c = all_on();
        let text = toml::to_string(&c).expect("serialise");
        assert_eq!(toml::from_str::<AugmentConfig>(&text).expect("parse"), c);
    }

    #[test]
    fn validation_errors_name_the_field() {
        // One bad value per case; the error's field is the dotted key of that value.
        let cases: Vec<(&str, AugmentConfig)> = vec![
            (
                "augment.rotation_prob",
                AugmentConfig {
                    rotation_prob: 1.5,
                    ..off()
                },
            ),
            (
                "augment.mirror_ap_prob",
                AugmentConfig {
                    mirror_ap_prob: -0.1,
                    ..off()
                },
            ),
            (
                "augment.gamma_prob",
                AugmentConfig {
                    gamma_prob: f64::NAN,
                    ..off()
                },
            ),
            (
                "augment.rotation_deg",
                AugmentConfig {
                    rotation_deg: [10.0, -10.0],
                    ..off()
                },
            ),
            (
                "augment.rotation_deg",
                AugmentConfig {
                    rotation_deg: [-270.0, 0.0],
                    ..off()
                },
            ),
            (
                "augment.scale",
                AugmentConfig {
                    scale: [0.0, 1.2],
                    ..off()
                },
            ),
            (
                "augment.elastic_alpha",
                AugmentConfig {
                    elastic_alpha: [-1.0, 5.0],
                    ..off()
                },
            ),
            (
                "augment.elastic_sigma",
                AugmentConfig {
                    elastic_sigma: [0.0, 5.0],
                    ..off()
                },
            ),
            (
                "augment.elastic_sigma",
                AugmentConfig {
                    elastic_sigma: [9.0, 1e6],
                    ..off()
                },
            ),
            (
                "augment.noise_variance",
                AugmentConfig {
                    noise_variance: [-1.0, 0.0],
                    ..off()
                },
            ),
            (
                "augment.blur_sigma",
                AugmentConfig {
                    blur_sigma: [1.0, 0.5],
                    ..off()
                },
            ),
            (
                "augment.brightness",
                AugmentConfig {
                    brightness: [0.0, 1.0],
                    ..off()
                },
            ),
            (
                "augment.contrast",
                AugmentConfig {
                    contrast: [f64::INFINITY, 2.0],
                    ..off()
                },
            ),
            (
                "augment.gamma",
                AugmentConfig {
                    gamma: [-0.5, 1.5],
                    ..off()
                },
            ),
        ];
        for (field, cfg) in cases {
            let e = cfg.validate("run.toml").expect_err(field);
            assert_eq!(e.field, field, "{e}");
            assert_eq!(e.source_name, "run.toml");
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    #[test]
    fn enabled_means_some_probability_is_positive() {
        assert!(!off().enabled());
        assert!(
            AugmentConfig {
                gamma_prob: 0.01,
                ..off()
            }
            .enabled()
        );
        assert!(
            AugmentConfig {
                mirror_lr_prob: 1.0,
                ..off()
            }
            .enabled()
        );
    }

    #[test]
    fn input_scale_matches_the_intensity_transform() {
        // DataConfig::transform with window [-200, 300]: air (-1000) clips to 0, water is
        // (0 + 200)/500 = 0.4, one HU is 1/500 = 0.002. Raw HU: -1000, 0, 1.
        let w = InputScale::window(-200.0, 300.0);
        assert_eq!((w.air, w.water, w.per_hu), (0.0, 0.4, 0.002));
        let r = InputScale::raw();
        assert_eq!((r.air, r.water, r.per_hu), (-1000.0, 0.0, 1.0));
    }

    // ---- 1. identity -----------------------------------------------------------------------

    #[test]
    fn all_probabilities_zero_is_the_identity() {
        // Nothing fires, so the slice is copied: equal bit for bit (compared as bits, so even a
        // NaN or a -0.0 in the input would have to survive).
        let n = 37;
        let (mut img, lab) = test_slice(n, 1);
        img[5] = -0.0;
        for seed in 0..20 {
            let mut rng = Rng::stream(seed, &[keys::AUGMENT, 0, seed]);
            let (oi, ol, a) = run(&img, &lab, n, &off(), &InputScale::raw(), &mut rng);
            assert_eq!(a, Applied::default());
            assert!(oi.iter().zip(&img).all(|(a, b)| a.to_bits() == b.to_bits()));
            assert_eq!(ol, lab);
        }
    }

    #[test]
    fn identity_ranges_with_probability_one_are_the_identity() {
        // Rotation [0, 0], scale [1, 1], elastic alpha [0, 0], brightness [1, 1], all with
        // probability 1: they all fire, but rotation 0 gives (sin, cos) = (0, 1) exactly, so every
        // output pixel pulls back to exactly its own centre (c + ((x − c)·1 + (y − c)·(−0)) = x in
        // exact arithmetic for these small half-integers), where bilinear returns the pixel
        // itself; the zero displacement field adds 0; x·1 = x. Even and odd sizes (centre
        // between pixels / on a pixel).
        let cfg = AugmentConfig {
            rotation_prob: 1.0,
            rotation_deg: [0.0, 0.0],
            scale_prob: 1.0,
            scale: [1.0, 1.0],
            elastic_prob: 1.0,
            elastic_alpha: [0.0, 0.0],
            brightness_prob: 1.0,
            brightness: [1.0, 1.0],
            ..off()
        };
        for n in [32, 33] {
            let (img, lab) = test_slice(n, 2);
            let mut rng = Rng::stream(3, &[keys::AUGMENT, 1, 2]);
            let (oi, ol, a) = run(&img, &lab, n, &cfg, &InputScale::raw(), &mut rng);
            assert!(a.spatial() && a.brightness == Some(1.0));
            assert!(oi.iter().zip(&img).all(|(a, b)| a.to_bits() == b.to_bits()));
            assert_eq!(ol, lab);
        }
    }

    // ---- 2. known rotation -----------------------------------------------------------------

    #[test]
    fn rotation_by_90_degrees_is_rot90() {
        // θ = 90° exactly (range [90, 90]): sin_cos_deg gives (1, 0) exactly, so the pull-back
        // of output (x', y') is src = (c − (y' − c), c + (x' − c)) = (n−1−y', x'), an exact
        // pixel: out[y'][x'] = in[x'][n−1−y'], which is np.rot90(a, k=1) (counter-clockwise as
        // displayed). Image and label, bit for bit.
        let n = 24;
        let (img, lab) = test_slice(n, 4);
        let cfg = AugmentConfig {
            rotation_prob: 1.0,
            rotation_deg: [90.0, 90.0],
            ..off()
        };
        let (oi, ol, _) = run(&img, &lab, n, &cfg, &InputScale::raw(), &mut Rng::new(5));
        for y in 0..n {
            for x in 0..n {
                let src = x * n + (n - 1 - y);
                assert_eq!(oi[y * n + x].to_bits(), img[src].to_bits(), "({y}, {x})");
                assert_eq!(ol[y * n + x], lab[src], "({y}, {x})");
            }
        }
    }

    #[test]
    fn rotation_90_with_scale_2_moves_a_point_where_the_closed_form_says() {
        // n = 33, centre c = 16. A single labelled pixel at (row 16, col 21): 5 px right of the
        // centre. Forward map: p' = c + s·R(θ)·(p − c) with R(90°) counter-clockwise as displayed
        // (right → up) and s = 2: (dx, dy) = (5, 0) → (0, −10), i.e. (row 6, col 16).
        //
        // Label (nearest, cells [k − ½, k + ½)): output (x', y') pulls back to
        // src_x = 16 − (y' − 16)/2, src_y = 16 + (x' − 16)/2. src_x ∈ [20.5, 21.5) ⇔
        // y' − 16 ∈ (−11, −9] ⇔ y' ∈ {6, 7}; src_y ∈ [15.5, 16.5) ⇔ x' − 16 ∈ [−1, 1) ⇔
        // x' ∈ {15, 16}. So exactly the 2×2 block rows {6, 7} × cols {15, 16} is labelled.
        //
        // Image (bilinear of a unit impulse at (21, 16)): a tent symmetric about the forward
        // image of the pixel centre, so its intensity-weighted centroid is exactly (row 6,
        // col 16); its peak value 1 is at (6, 16), where the pull-back hits (21, 16) exactly.
        let n = 33;
        let mut img = vec![0.0f32; n * n];
        let mut lab = vec![0u8; n * n];
        img[16 * n + 21] = 1.0;
        lab[16 * n + 21] = 1;
        let cfg = AugmentConfig {
            rotation_prob: 1.0,
            rotation_deg: [90.0, 90.0],
            scale_prob: 1.0,
            scale: [2.0, 2.0],
            ..off()
        };
        let bg = InputScale {
            air: 0.0,
            water: 0.0,
            per_hu: 1.0,
        };
        let (oi, ol, a) = run(&img, &lab, n, &cfg, &bg, &mut Rng::new(6));
        assert_eq!((a.rotation_deg, a.scale), (Some(90.0), Some(2.0)));
        let labelled: Vec<(usize, usize)> = (0..n * n)
            .filter(|&i| ol[i] == 1)
            .map(|i| (i / n, i % n))
            .collect();
        assert_eq!(labelled, vec![(6, 15), (6, 16), (7, 15), (7, 16)]);
        assert_eq!(oi[6 * n + 16], 1.0);
        let (mut m, mut my, mut mx) = (0.0f64, 0.0f64, 0.0f64);
        for (i, &v) in oi.iter().enumerate() {
            m += v as f64;
            my += v as f64 * (i / n) as f64;
            mx += v as f64 * (i % n) as f64;
        }
        assert!(
            (my / m - 6.0).abs() < 1e-9 && (mx / m - 16.0).abs() < 1e-9,
            "{} {}",
            my / m,
            mx / m
        );
    }

    #[test]
    fn scale_below_one_fills_the_outside_with_air_and_label_zero() {
        // s = 0.5 (shrink) about the centre c = 15.5 of n = 32: output column/row 0 pulls back to
        // c + (0 − c)/0.5 = −15.5, outside the slice, so the corner gets air (the InputScale's:
        // −1000 HU raw, 0 for a window starting above −1000 HU) and label 0, although the input
        // is labelled 1 everywhere.
        let n = 32;
        let img = vec![40.0f32; n * n];
        let lab = vec![1u8; n * n];
        let cfg = AugmentConfig {
            scale_prob: 1.0,
            scale: [0.5, 0.5],
            ..off()
        };
        let (oi, ol, _) = run(&img, &lab, n, &cfg, &InputScale::raw(), &mut Rng::new(1));
        assert_eq!((oi[0], ol[0]), (-1000.0, 0));
        // The centre pulls back inside: unchanged.
        let mid = 16 * n + 16;
        assert_eq!((oi[mid], ol[mid]), (40.0, 1));
        let w = InputScale::window(-200.0, 300.0);
        let (oi, _, _) = run(&img, &lab, n, &cfg, &w, &mut Rng::new(1));
        assert_eq!(oi[0], 0.0, "window: air is 0");
    }

    // ---- 3. label values -------------------------------------------------------------------

    #[test]
    fn labels_are_never_interpolated() {
        // Nearest-neighbour sampling copies an input label or writes 0 (outside), so under any
        // config every output label is in {0} ∪ (input labels): with input {0, 1, 2} it stays in
        // {0, 1, 2}; with input {0, 2} no 1 may appear; with input all-2, only {0, 2}.
        let mut meta = Rng::new(77);
        let n = 40;
        for k in 0..150u64 {
            let cfg = random_config(&mut meta);
            let (img, mut lab) = test_slice(n, k);
            let mut allowed = [true, true, true];
            match k % 3 {
                1 => {
                    lab.iter_mut()
                        .for_each(|l| *l = if *l == 1 { 0 } else { *l });
                    allowed = [true, false, true];
                }
                2 => {
                    lab.iter_mut().for_each(|l| *l = 2);
                    allowed = [true, false, true];
                }
                _ => {}
            }
            let mut rng = Rng::stream(k, &[keys::AUGMENT, k, k + 1]);
            let (oi, ol, _) = run(&img, &lab, n, &cfg, &InputScale::raw(), &mut rng);
            assert!(
                ol.iter().all(|&l| (l as usize) < 3 && allowed[l as usize]),
                "seed {k}"
            );
            assert!(oi.iter().all(|v| v.is_finite()), "seed {k}");
        }
    }

    // ---- 4. alignment ----------------------------------------------------------------------

    #[test]
    fn image_and_label_are_sampled_at_the_same_point() {
        // Spatial-only random configs. Bilinear interpolation reproduces a linear ramp exactly,
        // so sampling the ramps X[y][x] = x and Y[y][x] = y (two runs, same generator state, so
        // the same map) recovers each output pixel's source point (sx, sy). The label must then
        // be the input label at (floor(sx + ½), floor(sy + ½)). Checked where the source is
        // inside [0, n−1]² (air = −1e6 makes any blend with outside values fall far below 0)
        // and not within 1e-3 of a rounding tie (the ramps are f32, ~1e-5 px). Pixels whose
        // four neighbours are all outside must be air with label 0.
        let n = 48;
        let xs: Vec<f32> = (0..n * n).map(|i| (i % n) as f32).collect();
        let ys: Vec<f32> = (0..n * n).map(|i| (i / n) as f32).collect();
        let far = InputScale {
            air: -1e6,
            water: 0.0,
            per_hu: 1.0,
        };
        let mut meta = Rng::new(5);
        let mut checked = 0usize;
        for k in 0..60u64 {
            let mut cfg = random_config(&mut meta);
            cfg.noise_prob = 0.0;
            cfg.blur_prob = 0.0;
            cfg.brightness_prob = 0.0;
            cfg.contrast_prob = 0.0;
            cfg.gamma_prob = 0.0;
            cfg.gamma_inverted_prob = 0.0;
            cfg.rotation_prob = cfg.rotation_prob.max(0.5);
            let (_, lab) = test_slice(n, k);
            let rng = Rng::stream(9, &[keys::AUGMENT, 3, k]);
            let (sx, l1, _) = run(&xs, &lab, n, &cfg, &far, &mut rng.clone());
            let (sy, l2, _) = run(&ys, &lab, n, &cfg, &far, &mut rng.clone());
            assert_eq!(l1, l2, "same generator state, same map");
            for i in 0..n * n {
                let (x, y) = (sx[i] as f64, sy[i] as f64);
                if x == -1e6 && y == -1e6 {
                    assert_eq!(l1[i], 0, "outside is label 0");
                    continue;
                }
                let inside =
                    (0.0..=(n - 1) as f64).contains(&x) && (0.0..=(n - 1) as f64).contains(&y);
                let tie = |v: f64| ((v - v.floor()) - 0.5).abs() < 1e-3;
                if !inside || tie(x) || tie(y) {
                    continue;
                }
                let (cx, cy) = ((x + 0.5).floor() as usize, (y + 0.5).floor() as usize);
                assert_eq!(l1[i], lab[cy * n + cx], "seed {k} pixel {i} src ({x}, {y})");
                checked += 1;
            }
        }
        assert!(checked > 60 * n * n / 4, "checked only {checked}");
    }

    // ---- 5. determinism and keying ---------------------------------------------------------

    #[test]
    fn same_key_same_output_other_slice_other_output() {
        // The caller's contract: Rng::stream(seed, [AUGMENT, epoch, slice]). The output is a
        // function of that key: equal bits for equal keys (also with a fresh generator built on
        // another thread, as a loader thread would); a different slice index or epoch gives a
        // different augmentation.
        let n = 40;
        let (img, lab) = test_slice(n, 8);
        let cfg = all_on();
        let s = InputScale::window(-200.0, 300.0);
        let img01: Vec<f32> = img
            .iter()
            .map(|&h| (h.clamp(-200.0, 300.0) + 200.0) / 500.0)
            .collect();
        let go = |epoch: u64, slice: u64| {
            run(
                &img01,
                &lab,
                n,
                &cfg,
                &s,
                &mut Rng::stream(42, &[keys::AUGMENT, epoch, slice]),
            )
        };
        let (a_img, a_lab, a) = go(3, 17);
        let (b_img, b_lab, b) =
            std::thread::scope(|t| t.spawn(|| go(3, 17)).join().expect("thread"));
        assert_eq!(a, b);
        assert!(
            a_img
                .iter()
                .zip(&b_img)
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
        assert_eq!(a_lab, b_lab);
        let (c_img, _, c) = go(3, 18);
        assert_ne!(a, c, "another slice draws other parameters");
        assert!(a_img.iter().zip(&c_img).any(|(x, y)| x != y));
        let (_, _, d) = go(4, 17);
        assert_ne!(a, d, "another epoch draws other parameters");
    }

    #[test]
    fn intensity_transforms_do_not_change_the_geometry() {
        // Each transform draws from its own sub-generator, seeded in a fixed slot order whether
        // it is enabled or not: adding noise, blur, brightness, contrast and gamma leaves the
        // spatial parameters and so the label output unchanged for the same key.
        let n = 40;
        let (img, lab) = test_slice(n, 9);
        let spatial = AugmentConfig {
            noise_prob: 0.0,
            blur_prob: 0.0,
            brightness_prob: 0.0,
            contrast_prob: 0.0,
            gamma_inverted_prob: 0.0,
            gamma_prob: 0.0,
            ..all_on()
        };
        let key = [keys::AUGMENT, 2, 5];
        let (_, l1, a1) = run(
            &img,
            &lab,
            n,
            &spatial,
            &InputScale::raw(),
            &mut Rng::stream(1, &key),
        );
        let (_, l2, a2) = run(
            &img,
            &lab,
            n,
            &all_on(),
            &InputScale::raw(),
            &mut Rng::stream(1, &key),
        );
        assert!(l1 == l2, "labels differ");
        assert_eq!(
            (a1.rotation_deg, a1.scale, a1.elastic),
            (a2.rotation_deg, a2.scale, a2.elastic)
        );
    }

    #[test]
    fn pinned_output_for_a_fixed_key() {
        // Cross-machine reproducibility: a hash of the output bits for one key and the
        // everything-on config, pinned. All arithmetic is IEEE + − × ÷ √, floor/round and
        // detmath, so any machine must give this value; a change here is a change of the
        // augmentation (update it only deliberately).
        let n = 32;
        let (img, lab) = test_slice(n, 10);
        let (oi, ol, _) = run(
            &img,
            &lab,
            n,
            &all_on(),
            &InputScale::raw(),
            &mut Rng::stream(7, &[keys::AUGMENT, 1, 3]),
        );
        let mut h = 0xcbf2_9ce4_8422_2325u64; // FNV-1a
        for b in oi
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .chain(ol.iter().copied())
        {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        assert_eq!(h, PINNED_HASH, "output hash {h:#018x}");
    }
    const PINNED_HASH: u64 = 0xe55a_7329_a61c_9b7a;

    // ---- 7. mirroring ----------------------------------------------------------------------

    #[test]
    fn mirror_lr_flips_columns_and_mirror_ap_flips_rows() {
        // Canonical layout: columns run towards the patient's left, rows towards posterior.
        // mirror_lr: out[y][x] = in[y][n−1−x] (pull-back c − (x − c) = n−1−x, exact), so the
        // liver moves from the image's left (low columns) to the right. mirror_ap:
        // out[y][x] = in[n−1−y][x]. Both: a 180° turn. Bit for bit, image and label.
        let n = 30;
        let (img, lab) = test_slice(n, 11);
        let liver_cols = |l: &[u8]| -> f64 {
            let (mut s, mut k) = (0.0, 0.0);
            for (i, &v) in l.iter().enumerate() {
                if v > 0 {
                    s += (i % n) as f64;
                    k += 1.0;
                }
            }
            s / k
        };
        assert!(
            liver_cols(&lab) < n as f64 / 2.0,
            "test liver on the image's left"
        );
        for (lr, ap) in [(true, false), (false, true), (true, true)] {
            let cfg = AugmentConfig {
                mirror_lr_prob: if lr { 1.0 } else { 0.0 },
                mirror_ap_prob: if ap { 1.0 } else { 0.0 },
                ..off()
            };
            let (oi, ol, a) = run(&img, &lab, n, &cfg, &InputScale::raw(), &mut Rng::new(3));
            assert_eq!((a.mirror_lr, a.mirror_ap), (lr, ap));
            for y in 0..n {
                for x in 0..n {
                    let sy = if ap { n - 1 - y } else { y };
                    let sx = if lr { n - 1 - x } else { x };
                    assert_eq!(oi[y * n + x].to_bits(), img[sy * n + sx].to_bits());
                    assert_eq!(ol[y * n + x], lab[sy * n + sx]);
                }
            }
            if lr {
                assert!(
                    liver_cols(&ol) > n as f64 / 2.0,
                    "liver now on the image's right"
                );
            }
            // The same through the general sampling map (a 0° rotation makes it run): every
            // pull-back lands exactly on the mirrored pixel centre, so the bits agree with the
            // index flip used when mirroring is the only spatial transform.
            let general = AugmentConfig {
                rotation_prob: 1.0,
                rotation_deg: [0.0, 0.0],
                ..cfg
            };
            let (gi, gl, _) = run(
                &img,
                &lab,
                n,
                &general,
                &InputScale::raw(),
                &mut Rng::new(3),
            );
            assert!(gi.iter().zip(&oi).all(|(a, b)| a.to_bits() == b.to_bits()));
            assert_eq!(gl, ol);
        }
    }

    #[test]
    fn mirroring_is_off_by_default() {
        // Defaults: mirror_lr_prob = mirror_ap_prob = 0 (see the module docs).
        let d = AugmentConfig::default();
        assert_eq!((d.mirror_lr_prob, d.mirror_ap_prob), (0.0, 0.0));
    }

    // ---- intensity transforms ----------------------------------------------------------------

    #[test]
    fn brightness_scales_about_water() {
        // m = 1.2 exactly (range [1.2, 1.2]). Raw HU: x·1.2 (water = 0): 100 → 120, −1000 → −1200.
        // Window [−200, 300]: water = 0.4, so 0.6 → 0.4 + 0.2·1.2 = 0.64 (computed in f64, then
        // rounded to f32).
        let cfg = AugmentConfig {
            brightness_prob: 1.0,
            brightness: [1.2, 1.2],
            ..off()
        };
        let (oi, _, _) = run(
            &[100.0, -1000.0, 0.0, 50.0],
            &[0; 4],
            2,
            &cfg,
            &InputScale::raw(),
            &mut Rng::new(1),
        );
        assert_eq!(oi, vec![120.0, -1200.0, 0.0, 60.0]);
        let w = InputScale::window(-200.0, 300.0);
        let (oi, _, _) = run(
            &[0.6, 0.4, 0.0, 1.0],
            &[0; 4],
            2,
            &cfg,
            &w,
            &mut Rng::new(1),
        );
        let want = |x: f32| (0.4f32 as f64 + (x as f64 - 0.4f32 as f64) * 1.2) as f32;
        assert_eq!(oi, vec![want(0.6), want(0.4), want(0.0), want(1.0)]);
    }

    #[test]
    fn contrast_stays_within_the_original_range() {
        // f = 1.5 about the mean 2.5 of [0, 1, 4, 5]: (x − 2.5)·1.5 + 2.5 = [−1.25, 0.25, 4.75,
        // 6.25], clipped to the original [0, 5]: [0, 0.25, 4.75, 5].
        let cfg = AugmentConfig {
            contrast_prob: 1.0,
            contrast: [1.5, 1.5],
            ..off()
        };
        let (oi, _, _) = run(
            &[0.0, 1.0, 4.0, 5.0],
            &[0; 4],
            2,
            &cfg,
            &InputScale::raw(),
            &mut Rng::new(1),
        );
        assert_eq!(oi, vec![0.0, 0.25, 4.75, 5.0]);
    }

    #[test]
    fn gamma_follows_the_min_max_formula() {
        // g = 2 exactly, no retained stats, on [0, 1, 2, 4]: min 0, range r = 4 + 1e-7;
        // out = ((x/r)^2)·r: [0, 1/r, 4/r, 16/r] ≈ [0, 0.25, 1, 4]. Inverted variant: on −x,
        // min −4: out = −(((−x + 4)/r)^2·r − 4) ≈ −([16, 9, 4, 0]/4 − 4) = [0, 1.75, 3, 4].
        let img = [0.0f32, 1.0, 2.0, 4.0];
        let cfg = AugmentConfig {
            gamma_prob: 1.0,
            gamma: [2.0, 2.0],
            gamma_retain_stats: false,
            ..off()
        };
        let (oi, _, _) = run(&img, &[0; 4], 2, &cfg, &InputScale::raw(), &mut Rng::new(1));
        for (o, w) in oi.iter().zip([0.0, 0.25, 1.0, 4.0]) {
            assert!((o - w).abs() < 1e-6, "{oi:?}");
        }
        let cfg = AugmentConfig {
            gamma_inverted_prob: 1.0,
            gamma: [2.0, 2.0],
            gamma_retain_stats: false,
            ..off()
        };
        let (oi, _, _) = run(&img, &[0; 4], 2, &cfg, &InputScale::raw(), &mut Rng::new(1));
        for (o, w) in oi.iter().zip([0.0, 1.75, 3.0, 4.0]) {
            assert!((o - w).abs() < 1e-6, "{oi:?}");
        }
    }

    #[test]
    fn gamma_retain_stats_keeps_mean_and_std() {
        // With gamma_retain_stats the output is rescaled to the input's mean and (population)
        // standard deviation: equal to ~1e-6 relative (f32 output).
        let n = 32;
        let (img, lab) = test_slice(n, 12);
        let cfg = AugmentConfig {
            gamma_prob: 1.0,
            gamma: [0.6, 0.6],
            ..off()
        };
        let (oi, _, a) = run(&img, &lab, n, &cfg, &InputScale::raw(), &mut Rng::new(1));
        assert_eq!(a.gamma, Some(0.6));
        let stats = |v: &[f32]| {
            let x: Vec<f64> = v.iter().map(|&f| f as f64).collect();
            let m = x.iter().sum::<f64>() / x.len() as f64;
            (m, std_about(&x, m))
        };
        let ((m0, s0), (m1, s1)) = (stats(&img), stats(&oi));
        assert!(
            (m0 - m1).abs() < 1e-3 && (s0 - s1).abs() / s0 < 1e-5,
            "{m0} {m1} {s0} {s1}"
        );
        assert!(
            oi.iter().zip(&img).any(|(a, b)| (a - b).abs() > 1.0),
            "gamma changed the image"
        );
    }

    #[test]
    fn noise_has_the_requested_standard_deviation_in_hu() {
        // Variance 400 HU² (range [400, 400]) → std 20 HU → 20/500 = 0.04 in window [−200, 300]
        // units. The sample std of 128² deviates from 0.04 by ~0.04/√(2·16384) ≈ 2e-4 (1 s.e.),
        // we allow 2 %. Mean ~0 within 5 s.e. (0.04/128·5 ≈ 1.6e-3).
        let n = 128;
        let img = vec![0.5f32; n * n];
        let cfg = AugmentConfig {
            noise_prob: 1.0,
            noise_variance: [400.0, 400.0],
            ..off()
        };
        let s = InputScale::window(-200.0, 300.0);
        let (oi, _, a) = run(&img, &vec![0; n * n], n, &cfg, &s, &mut Rng::new(4));
        assert_eq!(a.noise_std_hu, Some(20.0));
        let d: Vec<f64> = oi.iter().map(|&v| v as f64 - 0.5).collect();
        let m = d.iter().sum::<f64>() / d.len() as f64;
        let sd = std_about(&d, m);
        assert!(
            m.abs() < 1.6e-3 && (sd - 0.04).abs() < 0.0008,
            "mean {m} sd {sd}"
        );
    }

    #[test]
    fn blur_preserves_a_constant_and_spreads_an_impulse_by_sigma() {
        // The kernel is normalised and the edges mirrored, so a constant image stays constant
        // (to f32 rounding). An impulse in the middle spreads into the (discrete, truncated)
        // Gaussian: its second moment along each axis is σ² up to the discretisation
        // (Σ w·x² of the sampled kernel: within 1e-3 of σ² for σ = 1).
        let n = 33;
        let cfg = AugmentConfig {
            blur_prob: 1.0,
            blur_sigma: [1.0, 1.0],
            ..off()
        };
        let (oi, _, _) = run(
            &vec![0.7f32; n * n],
            &vec![0; n * n],
            n,
            &cfg,
            &InputScale::raw(),
            &mut Rng::new(1),
        );
        assert!(oi.iter().all(|&v| (v - 0.7).abs() < 1e-6));
        let mut img = vec![0.0f32; n * n];
        img[16 * n + 16] = 1.0;
        let (oi, _, _) = run(
            &img,
            &vec![0; n * n],
            n,
            &cfg,
            &InputScale::raw(),
            &mut Rng::new(1),
        );
        let (mut m, mut vx) = (0.0f64, 0.0f64);
        for (i, &v) in oi.iter().enumerate() {
            m += v as f64;
            vx += v as f64 * ((i % n) as f64 - 16.0).powi(2);
        }
        assert!(
            (m - 1.0).abs() < 1e-5 && (vx / m - 1.0).abs() < 1e-3,
            "mass {m} var {}",
            vx / m
        );
    }

    #[test]
    fn elastic_displacement_has_the_simard_magnitude() {
        // The displacement is alpha·(G_σ * U(−1, 1)): per-axis variance alpha²·(1/3)·Σk², with
        // Σk² ≈ 1/(4πσ²) for a 2-D Gaussian, so RMS ≈ alpha/(σ·√(12π)) = 200/(10·6.14) ≈ 3.26 px
        // away from the borders (the zero padding shrinks it near them). Measured through the
        // ramp X[y][x] = x on the central half of a 128² slice: RMS of (sx − x) within 20 %
        // (a single realisation of a field with correlation length ~σ).
        let n = 128;
        let xs: Vec<f32> = (0..n * n).map(|i| (i % n) as f32).collect();
        let cfg = AugmentConfig {
            elastic_prob: 1.0,
            elastic_alpha: [200.0, 200.0],
            elastic_sigma: [10.0, 10.0],
            ..off()
        };
        let mut sum = 0.0;
        let mut k = 0.0;
        for seed in 0..4 {
            let (sx, _, _) = run(
                &xs,
                &vec![0; n * n],
                n,
                &cfg,
                &InputScale::raw(),
                &mut Rng::new(seed),
            );
            for y in n / 4..3 * n / 4 {
                for x in n / 4..3 * n / 4 {
                    sum += (sx[y * n + x] as f64 - x as f64).powi(2);
                    k += 1.0;
                }
            }
        }
        let rms = (sum / k).sqrt();
        let want = 200.0 / (10.0 * (12.0 * std::f64::consts::PI).sqrt());
        assert!((rms / want - 1.0).abs() < 0.2, "rms {rms} want {want}");
    }

    #[test]
    fn sin_cos_deg_is_exact_at_right_angles() {
        // Reducing in degrees makes multiples of 90° exact (detmath::sin_cos(0) = (0, 1)).
        assert_eq!(sin_cos_deg(0.0), (0.0, 1.0));
        assert_eq!(sin_cos_deg(90.0), (1.0, -0.0));
        assert_eq!(sin_cos_deg(-90.0), (-1.0, 0.0));
        assert_eq!(sin_cos_deg(180.0).1, -1.0);
        let (s, c) = sin_cos_deg(30.0);
        assert!((s - 0.5).abs() < 1e-15 && (c - 0.75f64.sqrt()).abs() < 1e-15);
    }

    #[test]
    fn fast_ln_exp_pow_match_libm() {
        // The detmath-style ln_fast / exp_fast agree with the platform libm (glibc: correctly
        // rounded or within 1 ulp) to 4e-16 relative (2 ulp); pow_fast to 2e-14 relative on
        // gamma's domain x ∈ (0, 1], g ∈ [0.3, 10] (its error grows with |g·ln x|).
        let mut x = 1e-300f64;
        while x < 1e300 {
            let (a, b) = (ln_fast(x), x.ln());
            assert!(
                (a - b).abs() <= 4e-16 * b.abs().max(1.0),
                "ln({x}) = {a} vs {b}"
            );
            x *= 1.37;
        }
        for &x in &[
            5e-324f64,
            1e-310,
            0.5,
            1.0,
            2.0,
            0.999_999_999,
            1.000_000_001,
        ] {
            let (a, b) = (ln_fast(x), x.ln());
            assert!(
                (a - b).abs() <= 4e-16 * b.abs().max(1.0),
                "ln({x}) = {a} vs {b}"
            );
        }
        assert_eq!(ln_fast(1.0), 0.0);
        assert_eq!(ln_fast(0.0), f64::NEG_INFINITY);
        assert!(ln_fast(-1.0).is_nan());
        let mut y = -740.0;
        while y < 709.0 {
            let (a, b) = (exp_fast(y), y.exp());
            assert!((a - b).abs() <= 4e-16 * b, "exp({y}) = {a} vs {b}");
            y += 0.377;
        }
        assert_eq!(exp_fast(0.0), 1.0);
        for i in 1..=1000 {
            let x = i as f64 / 1000.0;
            for g in [0.3, 0.7, 1.0, 1.3, 2.0, 10.0] {
                let (a, b) = (pow_fast(x, g), x.powf(g));
                assert!((a - b).abs() <= 2e-14 * b, "{x}^{g}: {a} vs {b}");
            }
        }
        assert_eq!(pow_fast(0.0, 0.7), 0.0);
        assert_eq!(pow_fast(1.0, 1.7), 1.0);
    }
}
