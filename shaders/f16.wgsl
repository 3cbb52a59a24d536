// IEEE 754 binary16 conversions shared by ctseg's WGSL kernels (each kernel's source is this
// file followed by the kernel, see src/wgsl.rs): f32 -> f16 rounds to nearest, ties to even, NaN
// kept quiet with its top mantissa bits (the `half` crate's and numpy's conversion); f16 -> f32
// is exact. Integer arithmetic only, so results are bit-exact on every adapter (WGSL leaves the
// rounding of pack2x16float and of f32 -> f16 casts to the implementation, and may flush
// subnormals).

fn f32_bits_to_f16(x: u32) -> u32 {
    let sign = (x >> 16u) & 0x8000u;
    let exp = (x >> 23u) & 0xffu;
    let man = x & 0x7fffffu;
    if exp == 0xffu {
        // Inf stays Inf; NaN stays a quiet NaN with the top 10 mantissa bits.
        if man != 0u {
            return sign | 0x7e00u | (man >> 13u);
        }
        return sign | 0x7c00u;
    }
    let e = i32(exp) - 112; // rebias 127 -> 15
    if e >= 31 {
        return sign | 0x7c00u; // overflow: Inf
    }
    if e <= 0 {
        // Subnormal half (or zero): value = m * 2^(e - 38), half subnormal unit 2^-24.
        if e < -10 {
            return sign; // below half the smallest subnormal: signed zero
        }
        let m = man | 0x800000u;
        let shift = u32(14 - e);
        let q = m >> shift;
        let rem = m & ((1u << shift) - 1u);
        let halfway = 1u << (shift - 1u);
        var r = q;
        if rem > halfway || (rem == halfway && (q & 1u) == 1u) {
            r = r + 1u;
        }
        return sign | r;
    }
    var r = (u32(e) << 10u) | (man >> 13u);
    let rem = man & 0x1fffu;
    if rem > 0x1000u || (rem == 0x1000u && (r & 1u) == 1u) {
        r = r + 1u; // a carry into the exponent is correct, up to Inf
    }
    return sign | r;
}

fn f16_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let exp = (h >> 10u) & 0x1fu;
    let man = h & 0x3ffu;
    if exp == 0x1fu {
        return bitcast<f32>(sign | 0x7f800000u | (man << 13u));
    }
    if exp == 0u {
        // Subnormal half: man * 2^-24, exact in f32 (a normal number there).
        let v = ldexp(f32(man), -24);
        return select(v, -v, sign != 0u);
    }
    return bitcast<f32>(sign | ((exp + 112u) << 23u) | (man << 13u));
}

// v rounded to the nearest binary16 value (Inf beyond its range), as an f32: what a tensor core
// reads of an f16 operand.
fn round_f16(v: f32) -> f32 {
    return f16_to_f32(f32_bits_to_f16(bitcast<u32>(v)));
}
