// The register-blocked tile product both convolution GEMMs share (conv3x3_forward.wgsl and
// conv3x3_weight_grad.wgsl; their sources are a header src/model/gpu_conv.rs writes, f16.wgsl,
// this file, then the kernel): a workgroup's TILE_ROWS x TILE_COLS output tile (the header's
// constants: 16 x 256, 32 x 128 or 64 x 64, so that few rows are empty at few output channels),
// a 4 x 4 block per invocation in registers, summed over 16 reduction steps staged in workgroup
// memory by the kernel.
// gemm_tile_coop.wgsl offers the same interface on cooperative matrices: Lanes, stage,
// begin_tile, accumulate_tile, end_tile, tile_value.

// Per staged reduction step, the values of the tile's rows (a: [16][TILE_ROWS]) and columns (b:
// [16][TILE_COLS]).
var<workgroup> a_tile: array<f32, 16u * TILE_ROWS>;
var<workgroup> b_tile: array<f32, 16u * TILE_COLS>;
// Invocations per row of 4 x 4 blocks: the tile is (TILE_ROWS / 4) x LANES_X blocks, 256 in all.
const LANES_X: u32 = TILE_COLS / 4u;
// acc[r * 4 + q]: row 4 ty + r, column 4 tx + q of the tile (ty, tx = lid / LANES_X,
// lid % LANES_X).
var<private> acc: array<f32, 16>;

// The invocation's identifiers the tile product needs (the kernel's entry-point argument).
struct Lanes {
    @builtin(local_invocation_index) lid: u32,
}

// A value as the staged tiles hold it.
fn stage(v: f32) -> f32 {
    return v;
}

fn begin_tile(lanes: Lanes) {
    for (var i = 0u; i < 16u; i++) {
        acc[i] = 0.0;
    }
}

// acc[r * 4 + q] += sum over the 16 staged steps of a[row 4 ty + r] * b[column 4 tx + q].
fn accumulate_tile(lanes: Lanes) {
    let ty = lanes.lid / LANES_X;
    let tx = lanes.lid % LANES_X;
    for (var s = 0u; s < 16u; s++) {
        var a: array<f32, 4>;
        var b: array<f32, 4>;
        for (var q = 0u; q < 4u; q++) {
            a[q] = a_tile[s * TILE_ROWS + ty * 4u + q];
            b[q] = b_tile[s * TILE_COLS + tx * 4u + q];
        }
        for (var r = 0u; r < 4u; r++) {
            for (var q = 0u; q < 4u; q++) {
                acc[r * 4u + q] = fma(a[r], b[q], acc[r * 4u + q]);
            }
        }
    }
}

// After the last accumulate_tile (every invocation calls it: the coop version has a barrier).
fn end_tile(lanes: Lanes) {}

// The tile's row 4 ty + r, column 4 tx + q (r, q < 4): the invocation's share of the output.
fn tile_value(lanes: Lanes, r: u32, q: u32) -> f32 {
    return acc[r * 4u + q];
}
