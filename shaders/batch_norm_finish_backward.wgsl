// Batch normalisation's parameter gradients from batch_norm_grad_sums.wgsl's slices, summed in
// slice order, and the coefficients batch_norm_apply.wgsl computes the input gradient with.
// With n values per channel, the mean x0 + dm (batch_norm_finish_forward.wgsl, centred on x0),
// r = 1/sqrt(var + eps), k = gamma*r and g = mult*dy:
//   dbeta = sum g, dgamma = r * sum g*(x - x0 - dm) = r * (sum g*(x - x0) - dm * sum g),
//   dx = k*g - k*dbeta/n - k*r*(x - x0 - dm)*dgamma/n,
//   coef[ch] = (k, 0, 0, b, x0, -k*dbeta/n - b*dm, 0, 0) with b = -k*r*dgamma/n.
// One invocation per channel.
//
// Bindings (f32): part ([c, slices, 2]), gamma, fwd ([c, 8]: the forward's coefficients, x0 at
// 1 and dm at 6), var ([c]), coef ([c, 8]), dgamma, dbeta ([c] each), info = [c, slices,
// n = batch*hw, bits of eps as f32].

@group(0) @binding(0) var<storage, read_write> part: array<f32>;
@group(0) @binding(1) var<storage, read_write> gamma: array<f32>;
@group(0) @binding(2) var<storage, read_write> fwd: array<f32>;
@group(0) @binding(3) var<storage, read_write> var_in: array<f32>;
@group(0) @binding(4) var<storage, read_write> coef: array<f32>;
@group(0) @binding(5) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(6) var<storage, read_write> dbeta: array<f32>;
@group(0) @binding(7) var<storage, read_write> info: array<u32>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = info[0];
    let slices = info[1];
    let n = f32(info[2]);
    let eps = bitcast<f32>(info[3]);
    let ch = wg.x * 256u + lid;
    if (ch >= c) {
        return;
    }
    var sg = 0.0;
    var sgc = 0.0;
    for (var s = 0u; s < slices; s++) {
        sg += part[(ch * slices + s) * 2u];
        sgc += part[(ch * slices + s) * 2u + 1u];
    }
    let o = ch * 8u;
    let dm = fwd[o + 6u];
    let r = 1.0 / sqrt(var_in[ch] + eps);
    let dg = r * (sgc - dm * sg);
    dbeta[ch] = sg;
    dgamma[ch] = dg;
    let k = gamma[ch] * r;
    let b = -k * r * dg / n;
    coef[o] = k;
    coef[o + 1u] = 0.0;
    coef[o + 2u] = 0.0;
    coef[o + 3u] = b;
    coef[o + 4u] = fwd[o + 1u];
    coef[o + 5u] = -k * sg / n - b * dm;
    coef[o + 6u] = 0.0;
    coef[o + 7u] = 0.0;
}
