// Batch normalisation's backward sums, per slice (shared code: batch_norm_reduce.wgsl):
//   part[ch, s] = (sum of g, sum of g*(x - x0)) over slice s of channel ch, g = dy times the
// plane's multiplier (a spatial dropout after the normalisation), x0 the forward's centre; the
// slices are combined in batch_norm_finish_backward.wgsl. One workgroup per (slice, channel).
//
// Bindings (f32, contiguous NCHW): x, dy, mult ([batch*c], read when flags & 1), fwd ([c, 8]:
// batch_norm_finish_forward.wgsl's coefficients, x0 at 1), part ([c, slices, 2]), info =
// [batch, c, hw, slice, slices, flags].

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> mult: array<f32>;
@group(0) @binding(3) var<storage, read_write> fwd: array<f32>;
@group(0) @binding(4) var<storage, read_write> part: array<f32>;
@group(0) @binding(5) var<storage, read_write> info: array<u32>;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = info[1];
    let hw = info[2];
    let slice = info[3];
    let slices = info[4];
    let scaled = (info[5] & 1u) != 0u;
    let s = wg.x;
    let ch = wg.y;
    let x0 = fwd[ch * 8u + 1u];
    let begin = s * slice;
    let end = min(begin + slice, info[0] * hw);
    var a = 0.0;
    var b = 0.0;
    for (var i = begin + lid; i < end; i += 256u) {
        let j = value_index(i, ch, c, hw);
        var g = dy[j];
        if (scaled) {
            g *= mult[j / hw];
        }
        a += g;
        b += g * (x[j] - x0);
    }
    let sums = workgroup_sum2(lid, a, b);
    if (lid == 0u) {
        part[(ch * slices + s) * 2u] = sums.x;
        part[(ch * slices + s) * 2u + 1u] = sums.y;
    }
}
