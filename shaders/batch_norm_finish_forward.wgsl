// Batch normalisation's forward statistics from batch_norm_stats.wgsl's slices (mean less the
// channel's first value x0, squared deviations), combined in slice order (Chan et al.'s pairwise
// update of counts, means and squared deviations), and the coefficients batch_norm_apply.wgsl
// normalises with, centred on x0 (x - x0 is exact near x0, and dm = mean - x0 is of the order
// of the spread: a mean large against the spread costs no precision, and no compensated sum is
// needed, which shader compilers may simplify away):
//   mean[ch] = x0 + dm, var[ch] (biased), r = 1/sqrt(var + eps),
//   coef[ch] = (gamma*r, x0, beta - gamma*r*dm, 0, 0, 0, dm, 0):
//   y = mult*(gamma*r*(x - x0) + beta - gamma*r*dm).
// One invocation per channel.
//
// Bindings (f32): part ([c, slices, 2]), x (contiguous NCHW, for x0), gamma, beta, mean, var
// ([c] each), coef ([c, 8]), info = [c, slices, slice, n = batch*hw, bits of eps as f32, hw].

@group(0) @binding(0) var<storage, read_write> part: array<f32>;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> gamma: array<f32>;
@group(0) @binding(3) var<storage, read_write> beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> mean: array<f32>;
@group(0) @binding(5) var<storage, read_write> var_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> coef: array<f32>;
@group(0) @binding(7) var<storage, read_write> info: array<u32>;

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
        let mb = part[(ch * slices + s) * 2u];
        let total = count + nb;
        let d = mb - m;
        m += d * (nb / total);
        m2 += part[(ch * slices + s) * 2u + 1u] + d * d * (count * nb / total);
        count = total;
    }
    let v = m2 / count;
    let r = 1.0 / sqrt(v + eps);
    // m is the mean's deviation from x0.
    let x0 = x[ch * info[5]];
    mean[ch] = x0 + m;
    var_out[ch] = v;
    let o = ch * 8u;
    let k = gamma[ch] * r;
    coef[o] = k;
    coef[o + 1u] = x0;
    coef[o + 2u] = beta[ch] - k * m;
    coef[o + 3u] = 0.0;
    coef[o + 4u] = 0.0;
    coef[o + 5u] = 0.0;
    coef[o + 6u] = m;
    coef[o + 7u] = 0.0;
}
