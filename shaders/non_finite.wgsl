// Whether any of n f32 values is Inf or NaN, decided on the bits (exponent all ones): WGSL lets
// an implementation assume float values are finite, so float comparisons and arithmetic cannot
// be trusted to see them.
//
// Bindings: values (f32 read as bit patterns), flag (one word, zero before the launch; set to
// 1 when a value is not finite), info = [n values, workgroups in x]. One invocation per value
// on a 2-D grid of workgroups.

@group(0) @binding(0) var<storage, read_write> values: array<u32>;
@group(0) @binding(1) var<storage, read_write> flag: array<atomic<u32>>;
@group(0) @binding(2) var<storage, read_write> info: array<u32>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wg.y * info[1] + wg.x) * 256u + lid;
    if (i >= info[0]) {
        return;
    }
    if ((values[i] & 0x7f800000u) == 0x7f800000u) {
        atomicOr(&flag[0], 1u);
    }
}
