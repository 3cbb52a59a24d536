// gemm_tile.wgsl's tile product on cooperative matrices (tensor cores where the adapter has
// them): the same interface, the staged values in f16 (mixed precision's operands: the kernels
// round them to f16 first, so the conversion is exact, but for f16 subnormals, below 6.1e-5,
// which an adapter may flush to zero) and f32 accumulation. The source starts
// with a header src/model/gpu_conv.rs writes for the adapter: `enable f16;
// enable wgpu_cooperative_matrix;`, the aliases CoopA / CoopB / CoopC (CT x CT matrices, f16
// A and B, f32 C) and the constants CT (8 or 16) and ACC (accumulators per subgroup).
//
// The 64 x 64 tile is cut into (64 / CT)^2 matrices of CT x CT; subgroup g accumulates
// matrices g, g + num_subgroups, ... (ACC at most; the caller sizes ACC for the adapter's
// largest subgroup, and tile_value gives NaN if the subgroups could not cover the tile).
// Cooperative operations need control flow uniform across the workgroup, so no branch depends
// on the subgroup: an accumulator beyond the last matrix repeats one and is stored to a
// scratch block after the tile, which nothing reads.

// [16][64], as in gemm_tile.wgsl: a_tile is the 64 x 16 A block column-major, b_tile the
// 16 x 64 B block row-major.
var<workgroup> a_tile: array<f16, 1024>;
var<workgroup> b_tile: array<f16, 1024>;
// The finished 64 x 64 tile, row-major, for the kernel's epilogue; then the scratch block.
var<workgroup> c_tile: array<f32, 4096u + 64u * CT>;
var<private> acc: array<CoopC, ACC>;

struct Lanes {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) nsg: u32,
}

fn stage(v: f32) -> f16 {
    return f16(v);
}

fn begin_tile(lanes: Lanes) {
    for (var i = 0u; i < ACC; i++) {
        acc[i] = CoopC();
    }
}

// Accumulator i's matrix: its index among the tile's (64 / CT)^2 (a repeat past the last).
fn matrix(lanes: Lanes, i: u32) -> u32 {
    return (lanes.sg + i * lanes.nsg) % ((64u / CT) * (64u / CT));
}

fn accumulate_tile(lanes: Lanes) {
    for (var i = 0u; i < ACC; i++) {
        let t = matrix(lanes, i);
        let row = (t / (64u / CT)) * CT;
        let col = (t % (64u / CT)) * CT;
        for (var s = 0u; s < 16u; s += CT) {
            let a = coopLoad<CoopA>(&a_tile[s * 64u + row], 64u);
            let b = coopLoadT<CoopB>(&b_tile[s * 64u + col], 64u);
            acc[i] = coopMultiplyAdd(a, b, acc[i]);
        }
    }
}

fn end_tile(lanes: Lanes) {
    for (var i = 0u; i < ACC; i++) {
        let t = matrix(lanes, i);
        let first = lanes.sg + i * lanes.nsg < (64u / CT) * (64u / CT);
        let at = select(4096u, (t / (64u / CT)) * CT * 64u + (t % (64u / CT)) * CT, first);
        coopStoreT(acc[i], &c_tile[at], 64u);
    }
    workgroupBarrier();
}

fn tile_value(lanes: Lanes, r: u32, q: u32) -> f32 {
    let v = c_tile[((lanes.lid / 16u) * 4u + r) * 64u + (lanes.lid % 16u) * 4u + q];
    // More matrices than the subgroups hold: never silently leave part of the tile out.
    let covered = lanes.nsg * ACC >= (64u / CT) * (64u / CT);
    return select(bitcast<f32>(0x7fc00000u), v, covered);
}
