// gemm_tile.wgsl's tile product on cooperative matrices (tensor cores where the adapter has
// them): the same interface, the staged values in f16 (mixed precision's operands: the kernels
// round them to f16 first, so the conversion is exact, but for f16 subnormals, below 6.1e-5,
// which an adapter may flush to zero) and f32 accumulation. The source starts
// with a header src/model/gpu_conv.rs writes for the adapter: `enable f16;
// enable wgpu_cooperative_matrix;`, the aliases CoopA / CoopB / CoopC (CT x CT matrices, f16
// A and B, f32 C) and the constants CT (8 or 16) and ACC (accumulators per subgroup).
//
// The TILE_ROWS x TILE_COLS tile (4,096 values; BLOCK is 4) is cut into MATRICES matrices of
// CT x CT; subgroup g accumulates matrices g, g + num_subgroups, ... (ACC at most; the caller sizes ACC for the adapter's
// largest subgroup, and tile_value gives NaN if the subgroups could not cover the tile).
// Cooperative operations need control flow uniform across the workgroup, so no branch depends
// on the subgroup: an accumulator beyond the last matrix repeats one and is stored to a
// scratch block after the tile, which nothing reads.

// As in gemm_tile.wgsl: a_tile is the TILE_ROWS x 16 A block column-major, b_tile the
// 16 x TILE_COLS B block row-major.
var<workgroup> a_tile: array<f16, 16u * TILE_ROWS>;
var<workgroup> b_tile: array<f16, 16u * TILE_COLS>;
// The finished tile, row-major, for the kernel's epilogue; then the scratch block (CT rows).
var<workgroup> c_tile: array<f32, 4096u + CT * TILE_COLS>;
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

// Matrices per row of the tile, and in all.
const PER_ROW: u32 = TILE_COLS / CT;
const MATRICES: u32 = (TILE_ROWS / CT) * PER_ROW;
// Invocations per row and column of the blocks tile_value hands out, as in gemm_tile.wgsl.
const LANES_X: u32 = TILE_COLS / BLOCK;
const LANES_Y: u32 = TILE_ROWS / BLOCK;

// As in gemm_tile.wgsl: the invocation's share of the tile is strided.
fn tile_row(lanes: Lanes, r: u32) -> u32 {
    return lanes.lid / LANES_X + r * LANES_Y;
}

fn tile_col(lanes: Lanes, q: u32) -> u32 {
    return lanes.lid % LANES_X + q * LANES_X;
}

// Accumulator i's matrix: its index among the tile's MATRICES (a repeat past the last).
fn matrix(lanes: Lanes, i: u32) -> u32 {
    return (lanes.sg + i * lanes.nsg) % MATRICES;
}

fn accumulate_tile(lanes: Lanes) {
    for (var i = 0u; i < ACC; i++) {
        let t = matrix(lanes, i);
        let row = (t / PER_ROW) * CT;
        let col = (t % PER_ROW) * CT;
        for (var s = 0u; s < 16u; s += CT) {
            let a = coopLoad<CoopA>(&a_tile[s * TILE_ROWS + row], TILE_ROWS);
            let b = coopLoadT<CoopB>(&b_tile[s * TILE_COLS + col], TILE_COLS);
            acc[i] = coopMultiplyAdd(a, b, acc[i]);
        }
    }
}

fn end_tile(lanes: Lanes) {
    for (var i = 0u; i < ACC; i++) {
        let t = matrix(lanes, i);
        let first = lanes.sg + i * lanes.nsg < MATRICES;
        let at = select(4096u, (t / PER_ROW) * CT * TILE_COLS + (t % PER_ROW) * CT, first);
        coopStoreT(acc[i], &c_tile[at], TILE_COLS);
    }
    workgroupBarrier();
}

fn tile_value(lanes: Lanes, r: u32, q: u32) -> f32 {
    let v = c_tile[tile_row(lanes, r) * TILE_COLS + tile_col(lanes, q)];
    // More matrices than the subgroups hold: never silently leave part of the tile out.
    let covered = lanes.nsg * ACC >= MATRICES;
    return select(bitcast<f32>(0x7fc00000u), v, covered);
}
