// Batch normalisation's forward statistics, per slice (shared code: batch_norm_reduce.wgsl):
//   part[ch, s] = (m - x0, sum of (x - m)^2) over slice s of channel ch, m the slice's mean and
// x0 the channel's first value; the slices are combined in batch_norm_finish_forward.wgsl.
// Two passes over the slice, the first summing deviations from x0: a mean large against the
// spread costs no precision. One workgroup per (slice, channel).
//
// Bindings (f32, contiguous NCHW): x, part ([c, slices, 2]), info = [batch, c, hw, slice,
// slices].

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> part: array<f32>;
@group(0) @binding(2) var<storage, read_write> info: array<u32>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = info[1];
    let hw = info[2];
    let slice = info[3];
    let slices = info[4];
    let s = wg.x;
    let ch = wg.y;
    let begin = s * slice;
    let end = min(begin + slice, info[0] * hw);
    let x0 = x[ch * hw];
    var a = 0.0;
    for (var i = begin + lid; i < end; i += 256u) {
        a += x[value_index(i, ch, c, hw)] - x0;
    }
    let dm = workgroup_sum2(lid, a, 0.0).x / f32(end - begin);
    let m = x0 + dm;
    var q = 0.0;
    for (var i = begin + lid; i < end; i += 256u) {
        let d = x[value_index(i, ch, c, hw)] - m;
        q += d * d;
    }
    let m2 = workgroup_sum2(lid, q, 0.0).x;
    if (lid == 0u) {
        part[(ch * slices + s) * 2u] = dm;
        part[(ch * slices + s) * 2u + 1u] = m2;
    }
}
