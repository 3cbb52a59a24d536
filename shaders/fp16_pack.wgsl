// fp16 gradient compression, pack side: f32 -> IEEE 754 binary16, round to nearest, ties to
// even, NaN kept quiet with its top mantissa bits (the `half` crate's and numpy's conversion).
// The conversion is shaders/f16.wgsl's (prepended to this source). Two halves per output word,
// the lower-indexed value in the low 16 bits (little-endian u16 order on the host).
//
// Bindings: input f32 values (read as bit patterns), output words, info = [n values,
// workgroups in x]. One invocation per output word; workgroups tile a 2-D grid because one
// dimension is capped at 65,535.

@group(0) @binding(0) var<storage, read_write> input: array<u32>;
@group(0) @binding(1) var<storage, read_write> output: array<u32>;
@group(0) @binding(2) var<storage, read_write> info: array<u32>;

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
