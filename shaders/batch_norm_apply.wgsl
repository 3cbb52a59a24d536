// Batch normalisation's elementwise pass, forward and backward alike, with per-channel
// coefficients (batch_norm_finish_forward.wgsl, batch_norm_finish_backward.wgsl) and a
// per-plane multiplier (a spatial dropout after the normalisation, 1 without):
//   out = mult[plane]*(a*(u - ou) + b) + e*(v - ov) + d,  (a, ou, b, e, ov, d) = coef[ch].
// Forward: u = v = x. Backward: u = dy, v = x (the input gradient).
//
// Bindings (f32, contiguous NCHW): u, v, mult ([batch*c], read when flags & 1), coef
// ([c, 8]), out, info = [total values, c, hw, flags, workgroups in x]. One invocation per
// value, on a 2-D grid of workgroups.

@group(0) @binding(0) var<storage, read_write> u: array<f32>;
@group(0) @binding(1) var<storage, read_write> v: array<f32>;
@group(0) @binding(2) var<storage, read_write> mult: array<f32>;
@group(0) @binding(3) var<storage, read_write> coef: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> info: array<u32>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wg.y * info[4] + wg.x) * 256u + lid;
    if (i >= info[0]) {
        return;
    }
    let plane = i / info[2];
    let o = (plane % info[1]) * 8u;
    var m = 1.0;
    if ((info[3] & 1u) != 0u) {
        m = mult[plane];
    }
    out[i] = m * (coef[o] * (u[i] - coef[o + 1u]) + coef[o + 2u])
        + coef[o + 3u] * (v[i] - coef[o + 4u]) + coef[o + 5u];
}
