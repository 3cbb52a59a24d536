// Batch normalisation's forward statistics from batch_norm_stats.wgsl's slices, combined in
// slice order (Chan et al.'s pairwise update: counts, means and squared deviations), and the
// coefficients batch_norm_apply.wgsl normalises with:
//   mean[ch], var[ch] (biased), r = 1/sqrt(var + eps),
//   coef[ch] = (gamma*r, mean, beta, 0, 0, 0, 0, 0): y = mult*(gamma*r*(x - mean) + beta).
// One invocation per channel.
//
// Bindings (f32): part ([c, slices, 2]), gamma, beta, mean, var ([c] each), coef ([c, 8]),
// info = [c, slices, slice, n = batch*hw, bits of eps as f32].

@group(0) @binding(0) var<storage, read_write> part: array<f32>;
@group(0) @binding(1) var<storage, read_write> gamma: array<f32>;
@group(0) @binding(2) var<storage, read_write> beta: array<f32>;
@group(0) @binding(3) var<storage, read_write> mean: array<f32>;
@group(0) @binding(4) var<storage, read_write> var_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> coef: array<f32>;
@group(0) @binding(6) var<storage, read_write> info: array<u32>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = info[0];
    let slices = info[1];
    let slice = info[2];
    let n = info[3];
    let eps = bitcast<f32>(info[4]);
    let ch = wg.x * 256u + lid;
    if (ch >= c) {
        return;
    }
    var count = 0.0;
    var m = 0.0;
    var m2 = 0.0;
    for (var s = 0u; s < slices; s++) {
        let nb = f32(min(slice, n - s * slice));
        let mb = part[(ch * slices + s) * 2u] / nb;
        let total = count + nb;
        let d = mb - m;
        m += d * (nb / total);
        m2 += part[(ch * slices + s) * 2u + 1u] + d * d * (count * nb / total);
        count = total;
    }
    let v = m2 / count;
    let r = 1.0 / sqrt(v + eps);
    mean[ch] = m;
    var_out[ch] = v;
    let o = ch * 8u;
    coef[o] = gamma[ch] * r;
    coef[o + 1u] = m;
    coef[o + 2u] = beta[ch];
    coef[o + 3u] = 0.0;
    coef[o + 4u] = 0.0;
    coef[o + 5u] = 0.0;
    coef[o + 6u] = 0.0;
    coef[o + 7u] = 0.0;
}
