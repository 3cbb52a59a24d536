// Mixed precision's unscale and overflow check of one gradient tensor in one pass:
// out = values × (1 / loss scale), and the flag set when an input or an output value is Inf or
// NaN, decided on the bits (WGSL lets an implementation assume float values are finite, so
// float comparisons cannot be trusted to see them; an input Inf must be seen even if the
// multiplication were simplified away, and a finite value that the unscaling takes past f32's
// range must be seen too).
//
// Bindings: values (f32), out (f32 bit patterns), flag (one word shared by all of a step's
// tensors, zero before the first launch; set to 1 when a value is not finite), info =
// [n values, workgroups in x, 1 / loss scale as f32 bits]. One invocation per value on a 2-D
// grid of workgroups.

@group(0) @binding(0) var<storage, read_write> values: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<storage, read_write> flag: array<atomic<u32>>;
@group(0) @binding(3) var<storage, read_write> info: array<u32>;

const EXPONENT: u32 = 0x7f800000u;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wg.y * info[1] + wg.x) * 256u + lid;
    if (i >= info[0]) {
        return;
    }
    let v = values[i];
    let u = bitcast<u32>(v * bitcast<f32>(info[2]));
    if ((bitcast<u32>(v) & EXPONENT) == EXPONENT || (u & EXPONENT) == EXPONENT) {
        atomicOr(&flag[0], 1u);
    }
    out[i] = u;
}
