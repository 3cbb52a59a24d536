// fp16 gradient compression, unpack side: IEEE 754 binary16 -> f32 (exact), times a scale
// (1/ranks, the average of the allreduced sum), one f32 rounding. Inverse of fp16_pack.wgsl:
// two halves per input word, the lower-indexed value in the low 16 bits. The conversion is
// shaders/f16.wgsl's (prepended to this source).
//
// Bindings: input words, output f32 values, info = [n values, workgroups in x, scale as f32
// bits]. One invocation per input word on a 2-D grid of workgroups.

@group(0) @binding(0) var<storage, read_write> input: array<u32>;
@group(0) @binding(1) var<storage, read_write> output: array<f32>;
@group(0) @binding(2) var<storage, read_write> info: array<u32>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let n = info[0];
    let scale = bitcast<f32>(info[2]);
    let word = (wg.y * info[1] + wg.x) * 256u + lid;
    let first = word * 2u;
    if first >= n {
        return;
    }
    let w = input[word];
    output[first] = f16_to_f32(w & 0xffffu) * scale;
    if first + 1u < n {
        output[first + 1u] = f16_to_f32(w >> 16u) * scale;
    }
}
