// Shared by the batch-normalisation reductions (batch_norm_stats.wgsl,
// batch_norm_grad_sums.wgsl): one workgroup reduces one slice of one channel's values.
// Channel ch's values are t[(b*c + ch)*hw + p] for b < batch, p < hw, numbered i = b*hw + p;
// slice s covers i in [s*slice, min((s + 1)*slice, batch*hw)). Each invocation walks every
// 256th value of the slice (so no loop runs longer than slice/256 iterations, far below an
// adapter's loop cap), and the invocations' sums meet in a fixed tree: results depend only on
// the shape.

var<workgroup> red: array<f32, 512>;

// The flat index of value i of channel ch.
fn value_index(i: u32, ch: u32, c: u32, hw: u32) -> u32 {
    let b = i / hw;
    return (b * c + ch) * hw + (i - b * hw);
}

// The sums over the workgroup's invocations of (a, b), every invocation getting both.
fn workgroup_sum2(lid: u32, a: f32, b: f32) -> vec2<f32> {
    red[lid] = a;
    red[256u + lid] = b;
    workgroupBarrier();
    for (var half = 128u; half > 0u; half = half >> 1u) {
        if (lid < half) {
            red[lid] += red[lid + half];
            red[256u + lid] += red[256u + lid + half];
        }
        workgroupBarrier();
    }
    let out = vec2<f32>(red[0], red[256]);
    workgroupBarrier();
    return out;
}
