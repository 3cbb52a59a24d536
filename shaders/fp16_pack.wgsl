// fp16 gradient compression, pack side: f32 -> IEEE 754 binary16, round to nearest, ties to
// even, NaN kept quiet with its top mantissa bits (the `half` crate's and numpy's conversion).
// Integer arithmetic only, so the result is bit-exact on every adapter (WGSL leaves the rounding
// of pack2x16float and of f32 -> f16 casts to the implementation). Two halves per output word,
// the lower-indexed value in the low 16 bits (little-endian u16 order on the host).
//
// Bindings: input f32 values (read as bit patterns), output words, info = [n values,
// workgroups in x]. One invocation per output word; workgroups tile a 2-D grid because one
// dimension is capped at 65,535.

@group(0) @binding(0) var<storage, read_write> input: array<u32>;
@group(0) @binding(1) var<storage, read_write> output: array<u32>;
@group(0) @binding(2) var<storage, read_write> info: array<u32>;

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

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let n = info[0];
    let word = (wg.y * info[1] + wg.x) * 256u + lid;
    let first = word * 2u;
    if first >= n {
        return;
    }
    let lo = f32_bits_to_f16(input[first]);
    var hi = 0u;
    if first + 1u < n {
        hi = f32_bits_to_f16(input[first + 1u]);
    }
    output[word] = lo | (hi << 16u);
}
