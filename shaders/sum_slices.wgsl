// The weight-gradient kernel's slices summed (shaders/conv3x3_weight_grad.wgsl), in slice
// order, and split into the weight and bias gradients:
//   dw[o, k] = sum_s part[s, o, k] for k < k_conv,  db[o] = sum_s part[s, o, k_conv].
//
// Bindings (f32): part ([slices, c_out, k_conv + 1]), dw ([c_out, k_conv]), db ([c_out]),
// info = [slices, c_out, k_conv, workgroups in x]. One invocation per value of one slice, on a
// 2-D grid of workgroups.

@group(0) @binding(0) var<storage, read_write> part: array<f32>;
@group(0) @binding(1) var<storage, read_write> dw: array<f32>;
@group(0) @binding(2) var<storage, read_write> db: array<f32>;
@group(0) @binding(3) var<storage, read_write> info: array<u32>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let slices = info[0];
    let c_out = info[1];
    let k_conv = info[2];
    let k_total = k_conv + 1u;
    let i = (wg.y * info[3] + wg.x) * 256u + lid;
    if (i >= c_out * k_total) {
        return;
    }
    var s = 0.0;
    for (var z = 0u; z < slices; z++) {
        s += part[z * c_out * k_total + i];
    }
    let o = i / k_total;
    let k = i % k_total;
    if (k < k_conv) {
        dw[o * k_conv + k] = s;
    } else {
        db[o] = s;
    }
}
