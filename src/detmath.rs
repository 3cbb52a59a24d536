//! Bit-reproducible `exp`, `ln`, `sin` and `cos` built from IEEE-754 `+ − × ÷` only.
//!
//! The platform's libm may differ in the last bit between C libraries and CPUs; the phantom
//! generator promises the same slice for the same seed on any machine, so everything it computes
//! goes through these functions (accurate to a few ulp, see the tests) instead of `f64::exp` etc.

const LN2: f64 = std::f64::consts::LN_2;
const PI: f64 = std::f64::consts::PI;

/// 2^k for integer k in the normal range, built from the exponent bits.
fn pow2(k: i64) -> f64 {
    let k = k.clamp(-1022, 1023);
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// e^x.
pub fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x > 709.0 {
        return f64::INFINITY;
    }
    if x < -745.0 {
        return 0.0;
    }
    // x = k·ln2 + r, |r| ≤ ln2/2; e^r by Taylor to degree 18 (error < 1e-17 for |r| ≤ 0.35).
    // ln2 split in two (fdlibm's Cody–Waite constants): k·LN2_HI is exact, so r keeps its bits.
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    let k = (x / LN2).round();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut term = 1.0;
    let mut sum = 1.0;
    for n in 1..=18 {
        term = term * r / n as f64;
        sum += term;
    }
    let k = k as i64;
    if k < -1022 {
        // subnormal result: scale in two steps
        sum * pow2(k + 600) * pow2(-600)
    } else {
        sum * pow2(k)
    }
}

/// Natural logarithm (NaN for x < 0, −∞ for 0).
pub fn ln(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return f64::NEG_INFINITY;
    }
    if x.is_infinite() {
        return x;
    }
    // x = m·2^e with m in [√½, √2); ln m = 2·atanh(s), s = (m−1)/(m+1), |s| ≤ 0.172.
    let mut x = x;
    let mut e: i64 = 0;
    if x < f64::MIN_POSITIVE {
        x *= pow2(60);
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
    let s2 = s * s;
    let mut term = s;
    let mut sum = 0.0;
    let mut n = 1.0;
    while n < 40.0 {
        sum += term / n;
        term *= s2;
        n += 2.0;
    }
    2.0 * sum + e as f64 * LN2
}

/// sin and cos of x (accurate for |x| up to ~1e6).
pub fn sin_cos(x: f64) -> (f64, f64) {
    // Reduce to r in [−π/4, π/4] and quadrant q.
    let q = (x / (PI / 2.0)).round();
    let r = x - q * (PI / 2.0);
    let r2 = r * r;
    // Taylor series to degree 21 / 20: error < 1e-18 for |r| ≤ π/4.
    let mut s_term = r;
    let mut s = r;
    let mut c_term = 1.0;
    let mut c = 1.0;
    for n in 1..=10 {
        let n2 = 2.0 * n as f64;
        s_term = -s_term * r2 / (n2 * (n2 + 1.0));
        s += s_term;
        c_term = -c_term * r2 / ((n2 - 1.0) * n2);
        c += c_term;
    }
    match (q as i64).rem_euclid(4) {
        0 => (s, c),
        1 => (c, -s),
        2 => (-s, -c),
        _ => (-c, s),
    }
}

/// sin x.
pub fn sin(x: f64) -> f64 {
    sin_cos(x).0
}

/// cos x.
pub fn cos(x: f64) -> f64 {
    sin_cos(x).1
}

#[cfg(test)]
mod tests {
    use super::*;

    // The reference is the platform libm (glibc), which is correctly rounded or within 1 ulp for
    // these functions; we only require agreement to ~1e-14 relative.
    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-300)
    }

    #[test]
    fn exp_matches_libm() {
        let mut x = -700.0;
        while x < 700.0 {
            assert!(
                close(exp(x), x.exp(), 4e-15),
                "exp({x}) = {} vs {}",
                exp(x),
                x.exp()
            );
            x += 0.737;
        }
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn ln_matches_libm() {
        for &x in &[
            1e-300f64, 1e-12, 0.001, 0.5, 0.999, 1.0, 1.5, 2.0, 10.0, 12345.678, 1e300,
        ] {
            let want: f64 = x.ln();
            assert!(
                (ln(x) - want).abs() <= 4e-15 * want.abs().max(1.0),
                "ln({x})"
            );
        }
        assert!(ln(-1.0).is_nan());
        assert_eq!(ln(0.0), f64::NEG_INFINITY);
    }

    #[test]
    fn sin_cos_match_libm() {
        let mut x = -50.0;
        while x < 50.0 {
            let (s, c) = sin_cos(x);
            assert!((s - x.sin()).abs() < 1e-14, "sin({x})");
            assert!((c - x.cos()).abs() < 1e-14, "cos({x})");
            x += 0.0173;
        }
    }
}
