//! Synthetic abdominal CT phantom: deterministic, realistic axial slices in HU with labels
//! 0 background / 1 liver / 2 tumour.
//!
//! A phantom *volume* is one synthetic patient: its anatomy (body size, fat layer, organ
//! positions, contrast phase, 3-D lesions) is drawn once from the stream `[PHANTOM, volume]`, and
//! each slice is a cut at height z ∈ (0, 1) through it, so neighbouring slices agree and a
//! train/validation split by volume is a split by patient. Same (seed, volume, slice, size) →
//! same slice on any machine: every draw comes from [`Rng`] and every transcendental function
//! from [`crate::detmath`].
//!
//! Values (DESIGN/issue table; portal-venous unless noted): air −1000; fat −110…−80; muscle
//! 40…70; liver 90…130 (plain scan 45…65); hypodense lesions liver − 20…65, 10 % hyperdense
//! liver + 10…40; spleen 100…130; kidney cortex 150…200; aorta 140…200; vertebra 150…300 inside,
//! 500…1000 rim; noise 10…20 HU blurred σ 0.7…1 px; image blur σ 0.5…1 px. Layout at N×N
//! (≈ 1.6 mm/px at 240): body ellipse semi-axes 0.42…0.46·N × 0.30…0.36·N, fat layer 10…25 mm,
//! spine near (0.5·N, 0.72·N), liver on the image's left (the patient's right).

use crate::detmath::{exp, sin_cos};
use crate::rng::{Rng, keys};

/// Label values.
pub const BACKGROUND: u8 = 0;
/// Liver (including intrahepatic vessels, as LiTS labels it).
pub const LIVER: u8 = 1;
/// Tumour (inside the liver).
pub const TUMOUR: u8 = 2;

/// Millimetres per pixel at size `n` (a constant field of view of 384 mm).
pub fn mm_per_px(n: usize) -> f64 {
    384.0 / n as f64
}

/// One generated slice.
#[derive(Clone, Debug, PartialEq)]
pub struct Slice {
    /// Width = height in pixels.
    pub size: usize,
    /// Row-major HU values (row 0 = anterior/top of the image).
    pub hu: Vec<i16>,
    /// Row-major labels 0/1/2.
    pub label: Vec<u8>,
}

/// A warped, rotated ellipse: inside where ρ ≤ 1 + Σₖ aₖ cos kθ + bₖ sin kθ (k = 2, 3, 4).
#[derive(Clone, Debug)]
struct Blob {
    cx: f64,
    cy: f64,
    a: f64,
    b: f64,
    cos_r: f64,
    sin_r: f64,
    harm: [(f64, f64); 3],
}

impl Blob {
    fn new(cx: f64, cy: f64, a: f64, b: f64, rot: f64) -> Self {
        let (s, c) = sin_cos(rot);
        Self {
            cx,
            cy,
            a: a.max(1e-6),
            b: b.max(1e-6),
            cos_r: c,
            sin_r: s,
            harm: [(0.0, 0.0); 3],
        }
    }

    fn warped(mut self, rng: &mut Rng, amount: f64) -> Self {
        for (k, h) in self.harm.iter_mut().enumerate() {
            let amp = amount / (k as f64 + 1.0);
            *h = (rng.range(-amp, amp), rng.range(-amp, amp));
        }
        self
    }

    /// ρ / boundary: < 1 inside, 1 on the boundary, grows outside (roughly a normalised distance).
    fn level(&self, x: f64, y: f64) -> f64 {
        let dx = x - self.cx;
        let dy = y - self.cy;
        let u = (dx * self.cos_r + dy * self.sin_r) / self.a;
        let v = (-dx * self.sin_r + dy * self.cos_r) / self.b;
        let rho = (u * u + v * v).sqrt();
        if rho < 1e-12 {
            return 0.0;
        }
        // cos kθ, sin kθ from (cos θ + i sin θ)^k: arithmetic only.
        let (c1, s1) = (u / rho, v / rho);
        let (mut ck, mut sk) = (c1, s1);
        let mut boundary = 1.0;
        for (a, b) in self.harm {
            let (c, s) = (ck * c1 - sk * s1, ck * s1 + sk * c1);
            ck = c;
            sk = s;
            boundary += a * ck + b * sk;
        }
        rho / boundary.max(0.2)
    }

    fn inside(&self, x: f64, y: f64) -> bool {
        self.level(x, y) <= 1.0
    }
}

/// A spherical-ish 3-D lesion; its cut at height z is a warped ellipse.
#[derive(Clone, Debug)]
struct Lesion {
    /// Centre in liver-normalised coordinates (unit disk) and height z.
    u: f64,
    v: f64,
    z: f64,
    radius_mm: f64,
    aspect: (f64, f64),
    rot: f64,
    harm_seed: u64,
    /// HU offset from the liver (negative: hypodense).
    delta_hu: f64,
    edge_sigma: f64,
}

/// Per-patient anatomy.
#[derive(Clone, Debug)]
struct Patient {
    body_a: f64,
    body_b: f64,
    body_cy: f64,
    fat_mm: f64,
    muscle_mm: f64,
    fat_hu: f64,
    muscle_hu: f64,
    liver_hu: f64,
    liver_cx: f64,
    liver_cy: f64,
    liver_a: f64,
    liver_b: f64,
    liver_rot: f64,
    liver_zc: f64,
    liver_harm_seed: u64,
    spleen_hu: f64,
    kidney_hu: f64,
    aorta_hu: f64,
    bone_hu: f64,
    rim_hu: f64,
    spine_dx: f64,
    lesions: Vec<Lesion>,
    noise_hu: f64,
    noise_sigma: f64,
    blur_sigma: f64,
}

impl Patient {
    fn draw(seed: u64, volume: u64) -> Self {
        let mut r = Rng::stream(seed, &[keys::PHANTOM, volume, u64::MAX]);
        let portal_venous = r.bernoulli(0.8);
        let liver_hu = if portal_venous {
            r.range(90.0, 130.0)
        } else {
            r.range(45.0, 65.0)
        };
        let enhance = if portal_venous { 1.0 } else { 0.0 };
        let n_lesions = if r.bernoulli(0.2) { 0 } else { 1 + r.below(6) };
        let radii = [4.0, 8.0, 16.0, 32.0];
        let lesions = (0..n_lesions)
            .map(|_| {
                let radius_mm = radii[r.below(4) as usize] * r.range(0.75, 1.25);
                let hyper = r.bernoulli(0.1);
                let delta_hu = if hyper {
                    r.range(10.0, 40.0)
                } else {
                    -r.range(20.0, 65.0)
                };
                // A point of the unit disk, kept away from the rim: the lesion's cut is later
                // clipped to the liver eroded by its radius.
                let (u, v) = loop {
                    let u = r.range(-0.8, 0.8);
                    let v = r.range(-0.8, 0.8);
                    if u * u + v * v <= 0.64 {
                        break (u, v);
                    }
                };
                Lesion {
                    u,
                    v,
                    z: r.range(0.15, 0.85),
                    radius_mm,
                    aspect: (r.range(0.75, 1.25), r.range(0.75, 1.25)),
                    rot: r.range(0.0, std::f64::consts::PI),
                    harm_seed: r.next_u64(),
                    delta_hu,
                    edge_sigma: r.range(1.0, 2.0),
                }
            })
            .collect();
        Patient {
            body_a: r.range(0.42, 0.46),
            body_b: r.range(0.30, 0.36),
            body_cy: r.range(0.47, 0.52),
            fat_mm: r.range(10.0, 25.0),
            muscle_mm: r.range(6.0, 12.0),
            fat_hu: r.range(-110.0, -80.0),
            muscle_hu: r.range(40.0, 70.0),
            liver_hu,
            liver_cx: r.range(0.27, 0.31),
            liver_cy: r.range(0.42, 0.48),
            liver_a: r.range(0.15, 0.19),
            liver_b: r.range(0.16, 0.21),
            liver_rot: r.range(-0.4, 0.4),
            liver_zc: r.range(0.42, 0.55),
            liver_harm_seed: r.next_u64(),
            spleen_hu: r.range(100.0, 130.0) - (1.0 - enhance) * 50.0,
            kidney_hu: r.range(150.0, 200.0) - (1.0 - enhance) * 110.0,
            aorta_hu: r.range(140.0, 200.0) - (1.0 - enhance) * 100.0,
            bone_hu: r.range(150.0, 300.0),
            rim_hu: r.range(500.0, 1000.0),
            spine_dx: r.range(-0.01, 0.01),
            lesions,
            noise_hu: r.range(10.0, 20.0),
            noise_sigma: r.range(0.7, 1.0),
            blur_sigma: r.range(0.5, 1.0),
        }
    }
}

/// Liver cross-section scale at height z: largest near `zc`, vanishing at the dome and the tip.
fn liver_scale(z: f64, zc: f64) -> f64 {
    let t = (z - zc) / 0.5;
    let f = 1.0 - t * t;
    if f <= 0.0 { 0.0 } else { f.sqrt() }
}

/// Separable Gaussian blur with reflected edges.
fn gaussian_blur(img: &mut [f64], n: usize, sigma: f64) {
    let kernel = gaussian_kernel(sigma);
    let r = kernel.len() / 2;
    let reflect = |i: isize| -> usize {
        let m = n as isize;
        let mut i = i;
        if i < 0 {
            i = -i - 1;
        }
        if i >= m {
            i = 2 * m - i - 1;
        }
        i.clamp(0, m - 1) as usize
    };
    let mut tmp = vec![0.0; n * n];
    for y in 0..n {
        for x in 0..n {
            let mut acc = 0.0;
            for (k, w) in kernel.iter().enumerate() {
                acc += w * img[y * n + reflect(x as isize + k as isize - r as isize)];
            }
            tmp[y * n + x] = acc;
        }
    }
    for y in 0..n {
        for x in 0..n {
            let mut acc = 0.0;
            for (k, w) in kernel.iter().enumerate() {
                acc += w * tmp[reflect(y as isize + k as isize - r as isize) * n + x];
            }
            img[y * n + x] = acc;
        }
    }
}

fn gaussian_kernel(sigma: f64) -> Vec<f64> {
    let r = (3.0 * sigma).ceil().max(1.0) as isize;
    let mut k: Vec<f64> = (-r..=r)
        .map(|i| exp(-((i * i) as f64) / (2.0 * sigma * sigma)))
        .collect();
    let s: f64 = k.iter().sum();
    k.iter_mut().for_each(|w| *w /= s);
    k
}

/// Generates slice `slice` (of `slices`) of phantom volume `volume` at `size`×`size`.
pub fn generate(seed: u64, volume: u64, slice: u64, slices: u64, size: usize) -> Slice {
    // 1. The patient, drawn once per volume, and this slice's own stream.
    let patient = Patient::draw(seed, volume);
    let mut r = Rng::stream(seed, &[keys::PHANTOM, volume, slice]);
    let z = (slice as f64 + 0.5) / slices.max(1) as f64;
    // 2. The patient's anatomy cut at height z, in pixels.
    let cut = Cut::new(seed, volume, &patient, z, slices, size, &mut r);
    // 3. Tissue values and labels, pixel by pixel.
    let (hu, label) = cut.paint();
    // 4. The scanner: image blur, then correlated noise.
    let hu = scan(hu, &patient, size, &mut r);
    Slice { size, hu, label }
}

/// The liver as cut at one height: its outline, vessels and lesion cuts.
struct LiverCut<'p> {
    outline: Blob,
    vessels: Vec<Blob>,
    vessel_hu: f64,
    lesions: Vec<(Blob, &'p Lesion)>,
}

/// One patient's anatomy cut at height z, laid out in pixels of an n × n image. Everything a
/// slice draws from its stream is drawn here, in one fixed order (the generator's output
/// depends on it).
struct Cut<'p> {
    p: &'p Patient,
    n: usize,
    body: Blob,
    /// The body inset by the subcutaneous fat: the muscle wall's outline.
    wall: Blob,
    /// The wall inset by the muscle: the abdominal cavity.
    cavity: Blob,
    spine: Spine,
    /// Present from mid-height down.
    kidneys: Option<[Blob; 2]>,
    /// Present in the upper part.
    spleen: Option<Blob>,
    /// Present where its cross-section is not vanishing.
    liver: Option<LiverCut<'p>>,
    /// Loops with their gas flag.
    bowel: Vec<(Blob, bool)>,
    bowel_hu: f64,
    ribs: Vec<Blob>,
}

/// The vertebra with its canal and posterior arch, the back muscles, and the great vessels in
/// front of the spine, placed from the vertebra's centre (cx, cy).
struct Spine {
    cx: f64,
    cy: f64,
    vertebra: Blob,
    canal: Blob,
    posterior: Blob,
    /// Psoas and erector spinae, left and right.
    back_muscles: [Blob; 4],
    aorta: Blob,
    ivc: Blob,
}

impl Spine {
    fn new(p: &Patient, nf: f64, mm: f64) -> Self {
        let cx = (0.5 + p.spine_dx) * nf;
        let cy = 0.72 * nf;
        let vert_r = 17.0 / mm;
        let at = |dx_mm: f64, dy_mm: f64, a_mm: f64, b_mm: f64, rot: f64| {
            Blob::new(cx + dx_mm / mm, cy + dy_mm / mm, a_mm / mm, b_mm / mm, rot)
        };
        Spine {
            cx,
            cy,
            vertebra: Blob::new(cx, cy, vert_r, vert_r * 0.9, 0.0),
            canal: Blob::new(cx, cy + vert_r * 1.45, 6.5 / mm, 5.5 / mm, 0.0),
            posterior: Blob::new(cx, cy + vert_r * 1.55, 13.0 / mm, 9.0 / mm, 0.0),
            back_muscles: [
                at(-30.0, 3.0, 16.0, 22.0, 0.3),
                at(30.0, 3.0, 16.0, 22.0, -0.3),
                at(-30.0, 40.0, 22.0, 16.0, 0.0),
                at(30.0, 40.0, 22.0, 16.0, 0.0),
            ],
            aorta: Blob::new(
                cx + 12.0 / mm,
                cy - vert_r - 13.0 / mm,
                11.0 / mm,
                11.0 / mm,
                0.0,
            ),
            ivc: Blob::new(
                cx - 22.0 / mm,
                cy - vert_r - 14.0 / mm,
                13.0 / mm,
                9.0 / mm,
                0.0,
            ),
        }
    }

    /// The value at (px, py) after the back muscles and the bone are painted over `v` (the
    /// great vessels lie in the cavity and are painted with it).
    fn paint(&self, p: &Patient, px: f64, py: f64, mut v: f64) -> f64 {
        if self.back_muscles.iter().any(|m| m.inside(px, py)) {
            v = p.muscle_hu;
        }
        if self.posterior.inside(px, py) {
            v = if self.posterior.level(px, py) > 0.8 {
                p.rim_hu
            } else {
                p.bone_hu
            };
        }
        if self.canal.inside(px, py) {
            v = 15.0;
        }
        if self.vertebra.inside(px, py) {
            v = if self.vertebra.level(px, py) > 0.85 {
                p.rim_hu
            } else {
                p.bone_hu
            };
        }
        v
    }
}

/// A copy of `blob` with both semi-axes shortened by `d_px`.
fn inset(blob: &Blob, d_px: f64) -> Blob {
    let mut b = blob.clone();
    b.a = (b.a - d_px).max(1.0);
    b.b = (b.b - d_px).max(1.0);
    b
}

/// The point (u, v) of the unit disk mapped onto `outline`'s rotated ellipse.
fn within(outline: &Blob, u: f64, v: f64) -> (f64, f64) {
    let (s, c) = (outline.sin_r, outline.cos_r);
    let (du, dv) = (u * outline.a, v * outline.b);
    (outline.cx + du * c - dv * s, outline.cy + du * s + dv * c)
}

impl<'p> Cut<'p> {
    fn new(
        seed: u64,
        volume: u64,
        p: &'p Patient,
        z: f64,
        slices: u64,
        n: usize,
        r: &mut Rng,
    ) -> Self {
        let nf = n as f64;
        let mm = mm_per_px(n);
        // 1. Body layers; the body drifts a little with z.
        let drift = 1.0 + 0.03 * (z - 0.5);
        let body = Blob::new(
            0.5 * nf,
            p.body_cy * nf,
            p.body_a * nf * drift,
            p.body_b * nf * drift,
            0.0,
        )
        .warped(
            &mut Rng::stream(seed, &[keys::PHANTOM, volume, u64::MAX - 1]),
            0.03,
        );
        let wall = inset(&body, p.fat_mm / mm);
        let cavity = inset(&wall, p.muscle_mm / mm);

        // 2. Spine, back muscles and great vessels, placed from the spine.
        let spine = Spine::new(p, nf, mm);

        // 3. Organs whose cross-section depends on z.
        let kidneys = (z > 0.45).then(|| {
            let k = (1.0 - ((z - 0.75) / 0.32).powi(2)).max(0.0).sqrt();
            let kidney = |dx_mm: f64, rot: f64| {
                let (cx, cy) = (spine.cx + dx_mm / mm, spine.cy - 8.0 / mm);
                Blob::new(cx, cy, 28.0 / mm * k, 38.0 / mm * k, rot)
            };
            [kidney(-70.0, 0.5), kidney(70.0, -0.5)]
        });
        let sscale = if z < 0.6 {
            (1.0 - ((z - 0.3) / 0.32).powi(2)).max(0.0).sqrt()
        } else {
            0.0
        };
        let spleen = (sscale > 0.2).then(|| {
            Blob::new(
                0.76 * nf,
                0.52 * nf,
                0.06 * nf * sscale,
                0.12 * nf * sscale,
                -0.5,
            )
            .warped(
                &mut Rng::stream(seed, &[keys::PHANTOM, volume, u64::MAX - 2]),
                0.08,
            )
        });
        let ls = liver_scale(z, p.liver_zc);
        let liver = Blob::new(
            p.liver_cx * nf + 0.03 * nf * (1.0 - ls),
            p.liver_cy * nf,
            p.liver_a * nf * ls,
            p.liver_b * nf * ls,
            p.liver_rot,
        )
        .warped(
            &mut Rng::stream(seed, &[keys::PHANTOM, p.liver_harm_seed]),
            0.12,
        );

        // 4. What this slice draws from its own stream, in this order: bowel, ribs, vessels.
        let (bowel, bowel_hu) = Self::bowel(r, z, nf, mm);
        let ribs = Self::ribs(r, &wall, z, mm);
        let vessels = Self::vessels(r, &liver, mm);
        let vessel_hu = p.liver_hu
            + if p.liver_hu > 80.0 {
                r.range(30.0, 60.0)
            } else {
                r.range(-5.0, 10.0)
            };

        // 5. The liver with its lesions, where it is cut at all.
        let liver = (ls > 0.2).then(|| LiverCut {
            lesions: Self::lesion_cuts(p, &liver, z, slices, mm),
            outline: liver,
            vessels,
            vessel_hu,
        });
        Cut {
            p,
            n,
            body,
            wall,
            cavity,
            spine,
            kidneys,
            spleen,
            liver,
            bowel,
            bowel_hu,
            ribs,
        }
    }

    /// Bowel loops (soft tissue with gas) in the anterior and right-lower cavity.
    fn bowel(r: &mut Rng, z: f64, nf: f64, mm: f64) -> (Vec<(Blob, bool)>, f64) {
        let count = 4 + r.below(6) as usize;
        let loops = (0..count)
            .map(|_| {
                let cx = r.range(0.40, 0.78) * nf;
                let cy = r.range(0.28, 0.58) * nf;
                let rad = r.range(8.0, 20.0) / mm;
                let gas = r.bernoulli(0.45 + 0.3 * z);
                (
                    Blob::new(
                        cx,
                        cy,
                        rad * r.range(0.8, 1.3),
                        rad * r.range(0.8, 1.3),
                        r.range(0.0, std::f64::consts::PI),
                    )
                    .warped(r, 0.1),
                    gas,
                )
            })
            .collect();
        (loops, r.range(20.0, 50.0))
    }

    /// Ribs: bone cross-sections along the lateral and posterolateral body wall, fewer caudally.
    fn ribs(r: &mut Rng, wall: &Blob, z: f64, mm: f64) -> Vec<Blob> {
        let per_side = 1 + ((1.0 - z) * 5.0).round() as usize;
        let mut ribs = Vec::new();
        for side in [0.0, 1.0] {
            for k in 0..per_side {
                let t = (k as f64 + 0.5) / per_side as f64;
                // Angles (x right, y down): right side −40°…60°, left side 120°…220°.
                let deg = if side == 0.0 {
                    -40.0 + 100.0 * t
                } else {
                    120.0 + 100.0 * t
                } + r.range(-6.0, 6.0);
                let (sn, cs) = sin_cos(deg.to_radians());
                let rr = r.range(0.93, 0.99);
                let rad = r.range(4.0, 6.5) / mm;
                ribs.push(Blob::new(
                    wall.cx + rr * wall.a * cs,
                    wall.cy + rr * wall.b * sn,
                    rad,
                    rad * 0.7,
                    deg.to_radians(),
                ));
            }
        }
        ribs
    }

    /// Intrahepatic vessels: bright dots (portal-venous phase), labelled liver. Drawn whether or
    /// not the liver is cut, so that the stream's later draws do not depend on it.
    fn vessels(r: &mut Rng, liver: &Blob, mm: f64) -> Vec<Blob> {
        let count = 3 + r.below(6) as usize;
        (0..count)
            .map(|_| {
                let rad = r.range(2.0, 4.5) / mm;
                let (u, v) = (r.range(-0.6, 0.6), r.range(-0.6, 0.6));
                let (cx, cy) = within(liver, u, v);
                Blob::new(
                    cx,
                    cy,
                    rad,
                    rad * r.range(1.0, 2.0),
                    r.range(0.0, std::f64::consts::PI),
                )
            })
            .collect()
    }

    /// The cuts of the patient's 3-D lesions at height z (5 mm slices).
    fn lesion_cuts(
        p: &'p Patient,
        liver: &Blob,
        z: f64,
        slices: u64,
        mm: f64,
    ) -> Vec<(Blob, &'p Lesion)> {
        let half_depth_mm = 0.5 * slices as f64 * 5.0;
        p.lesions
            .iter()
            .filter_map(|les| {
                let dz_mm = (z - les.z) * 2.0 * half_depth_mm;
                let rr = les.radius_mm * les.radius_mm - dz_mm * dz_mm;
                if rr <= 0.0 {
                    return None;
                }
                let rad_px = rr.sqrt() / mm;
                // Keep the centre inside the liver eroded by the lesion radius.
                let shrink = (1.0 - les.radius_mm / mm / liver.a.min(liver.b).max(1.0)).max(0.0);
                let (cx, cy) = within(liver, les.u * shrink, les.v * shrink);
                let blob = Blob::new(
                    cx,
                    cy,
                    rad_px * les.aspect.0,
                    rad_px * les.aspect.1,
                    les.rot,
                )
                .warped(&mut Rng::new(les.harm_seed), 0.15);
                Some((blob, les))
            })
            .collect()
    }

    /// HU values (before the scanner) and labels of every pixel.
    fn paint(&self) -> (Vec<f64>, Vec<u8>) {
        let n = self.n;
        let lesion_delta = self.lesion_delta();
        let mut hu = vec![-1000.0f64; n * n];
        let mut label = vec![BACKGROUND; n * n];
        for y in 0..n {
            for x in 0..n {
                let i = y * n + x;
                (hu[i], label[i]) = self.pixel(x as f64 + 0.5, y as f64 + 0.5, lesion_delta[i]);
            }
        }
        (hu, label)
    }

    /// Each lesion's HU offset with its blurred edge, summed over lesions.
    fn lesion_delta(&self) -> Vec<f64> {
        let n = self.n;
        let mut delta = vec![0.0f64; n * n];
        for (blob, les) in self.liver.iter().flat_map(|l| &l.lesions) {
            let mut mask = vec![0.0f64; n * n];
            for y in 0..n {
                for x in 0..n {
                    if blob.inside(x as f64 + 0.5, y as f64 + 0.5) {
                        mask[y * n + x] = 1.0;
                    }
                }
            }
            gaussian_blur(&mut mask, n, les.edge_sigma);
            for (d, m) in delta.iter_mut().zip(&mask) {
                *d += les.delta_hu * m;
            }
        }
        delta
    }

    /// The value and label at pixel centre (px, py): later structures paint over earlier ones.
    fn pixel(&self, px: f64, py: f64, lesion_delta: f64) -> (f64, u8) {
        let p = self.p;
        if !self.body.inside(px, py) {
            return (-1000.0, BACKGROUND);
        }
        let (mut v, mut label) = (p.fat_hu, BACKGROUND);
        if self.wall.inside(px, py) {
            v = p.muscle_hu;
        }
        if self.cavity.inside(px, py) {
            (v, label) = self.viscera(px, py, lesion_delta);
        }
        for rib in &self.ribs {
            let l = rib.level(px, py);
            if l <= 1.0 {
                v = if l > 0.6 { p.rim_hu * 0.7 } else { p.bone_hu };
            }
        }
        (self.spine.paint(p, px, py, v), label)
    }

    /// The value and label at a pixel inside the abdominal cavity.
    fn viscera(&self, px: f64, py: f64, lesion_delta: f64) -> (f64, u8) {
        let p = self.p;
        let mut v = p.fat_hu + 15.0; // visceral fat with some stranding
        for (b, gas) in &self.bowel {
            let l = b.level(px, py);
            if l <= 1.0 {
                v = if *gas && l < 0.7 {
                    -1000.0
                } else {
                    self.bowel_hu
                };
            }
        }
        if let Some([left, right]) = &self.kidneys
            && (left.inside(px, py) || right.inside(px, py))
        {
            let l = left.level(px, py).min(right.level(px, py));
            v = if l < 0.55 {
                p.kidney_hu - 60.0
            } else {
                p.kidney_hu
            };
        }
        if self.spleen.as_ref().is_some_and(|s| s.inside(px, py)) {
            v = p.spleen_hu;
        }
        if self.spine.ivc.inside(px, py) {
            v = p.aorta_hu - 40.0;
        }
        if self.spine.aorta.inside(px, py) {
            v = p.aorta_hu;
        }
        let Some(liver) = &self.liver else {
            return (v, BACKGROUND);
        };
        if liver.outline.level(px, py) > 1.0 || self.cavity.level(px, py) >= 0.97 {
            return (v, BACKGROUND);
        }
        v = if liver.vessels.iter().any(|b| b.inside(px, py)) {
            liver.vessel_hu
        } else {
            p.liver_hu
        };
        let label = if liver.lesions.iter().any(|(b, _)| b.inside(px, py)) {
            TUMOUR
        } else {
            LIVER
        };
        (v + lesion_delta, label)
    }
}

/// The scanner: image blur, then correlated noise with the patient's standard deviation, rounded
/// to the stored HU range.
fn scan(mut hu: Vec<f64>, p: &Patient, n: usize, r: &mut Rng) -> Vec<i16> {
    gaussian_blur(&mut hu, n, p.blur_sigma);
    let mut noise: Vec<f64> = (0..n * n).map(|_| r.normal()).collect();
    gaussian_blur(&mut noise, n, p.noise_sigma);
    // Blurring unit white noise with kernel k leaves variance (Σ kᵢ²)² in 2-D.
    let k = gaussian_kernel(p.noise_sigma);
    let gain: f64 = k.iter().map(|w| w * w).sum();
    let scale = p.noise_hu / gain;
    hu.iter()
        .zip(&noise)
        .map(|(v, e)| (v + scale * e).round().clamp(-1024.0, 3071.0) as i16)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_distinct() {
        let a = generate(1, 3, 10, 24, 64);
        let b = generate(1, 3, 10, 24, 64);
        assert_eq!(a, b);
        assert_ne!(a.hu, generate(1, 4, 10, 24, 64).hu);
        assert_ne!(a.hu, generate(2, 3, 10, 24, 64).hu);
    }

    #[test]
    fn same_slice_on_every_machine() {
        // CRC-32 of the HU bytes and labels of one slice, recorded when the generator was
        // written (x86-64, glibc 2.36). Only IEEE +, −, ×, ÷, sqrt and the functions of
        // `detmath` go into a slice, so another machine must give the same bytes; a change of
        // this number means the generator changed (and every stored phantom dataset with it).
        let s = generate(1, 3, 10, 24, 64);
        let bytes: Vec<u8> =
            s.hu.iter()
                .flat_map(|v| v.to_le_bytes())
                .chain(s.label.iter().copied())
                .collect();
        let crc = crc32fast::hash(&bytes);
        assert_eq!(crc, GOLDEN_CRC, "phantom slice changed: crc {crc:08x}");
    }

    const GOLDEN_CRC: u32 = 0x6fe6_bfcf;

    #[test]
    fn same_volume_on_every_machine() {
        // CRC-32 of every slice of one volume at 48² (liver at every height, lesions cut in the
        // lower half, kidneys below mid-height, spleen above), recorded with the generator as it
        // was before `Cut` split it into steps (2026-12-02; the same bytes for 1,152 slices of 2
        // seeds, 12 volumes and 2 sizes, compared slice by slice), so that a restructuring which
        // changes any branch's output fails here and not only in the one slice above.
        let mut crc = crc32fast::Hasher::new();
        for slice in 0..24 {
            let s = generate(1, 3, slice, 24, 48);
            s.hu.iter().for_each(|v| crc.update(&v.to_le_bytes()));
            crc.update(&s.label);
        }
        assert_eq!(crc.finalize(), 0x19f4_0033);
    }

    #[test]
    fn liver_on_image_left_and_values_in_range() {
        let n = 128;
        let mut left = 0usize;
        let mut right = 0usize;
        let mut liver_hu = Vec::new();
        for v in 0..6 {
            let s = generate(5, v, 12, 24, n);
            for y in 0..n {
                for x in 0..n {
                    let l = s.label[y * n + x];
                    if l >= LIVER {
                        if x < n / 2 { left += 1 } else { right += 1 }
                    }
                    if l == LIVER {
                        liver_hu.push(s.hu[y * n + x] as f64);
                    }
                }
            }
            assert!(s.hu[0] <= -950, "corner is air");
        }
        assert!(
            left > 20 * right,
            "liver should lie on the image's left: {left} vs {right}"
        );
        liver_hu.sort_by(|a, b| a.total_cmp(b));
        let median = liver_hu[liver_hu.len() / 2];
        assert!((40.0..=140.0).contains(&median), "liver median {median} HU");
    }
}
