// The register-blocked tile product both convolution GEMMs share (conv3x3_forward.wgsl and
// conv3x3_weight_grad.wgsl; their sources are a header src/model/gpu_conv.rs writes, f16.wgsl,
// this file, then the kernel): a workgroup's TILE_ROWS x TILE_COLS output tile (the header's
// constants: 32 x 128 or 64 x 64 with BLOCK 4, 128 x 128 with BLOCK 8), a BLOCK x BLOCK block
// per invocation in registers, summed over 16 reduction steps staged in workgroup memory by the
// kernel.
// gemm_tile_coop.wgsl offers the same interface on cooperative matrices: Lanes, stage,
// begin_tile, accumulate_tile, end_tile, tile_row, tile_col, tile_value.

// Per staged reduction step, the values of the tile's rows (a: [16][TILE_ROWS]) and columns (b:
// [16][TILE_COLS]).
var<workgroup> a_tile: array<f32, 16u * TILE_ROWS>;
var<workgroup> b_tile: array<f32, 16u * TILE_COLS>;
// Invocations per row and per column of the tile: (TILE_ROWS / BLOCK) x LANES_X, 256 in all.
const LANES_X: u32 = TILE_COLS / BLOCK;
const LANES_Y: u32 = TILE_ROWS / BLOCK;
// acc[r * BLOCK + q]: the tile's row tile_row(r), column tile_col(q).
var<private> acc: array<f32, BLOCK * BLOCK>;

// The invocation's identifiers the tile product needs (the kernel's entry-point argument).
struct Lanes {
    @builtin(local_invocation_index) lid: u32,
}

// The tile's row of the invocation's block row r and column of its block column q (r, q <
// BLOCK). A block's rows and columns are strided, LANES_Y and LANES_X apart, so that in every
// read of a staged step neighbouring invocations read neighbouring values (no workgroup-memory
// bank conflicts), and in the kernels' stores neighbouring columns.
fn tile_row(lanes: Lanes, r: u32) -> u32 {
    return lanes.lid / LANES_X + r * LANES_Y;
}

fn tile_col(lanes: Lanes, q: u32) -> u32 {
    return lanes.lid % LANES_X + q * LANES_X;
}

// A value as the staged tiles hold it.
fn stage(v: f32) -> f32 {
    return v;
}

fn begin_tile(lanes: Lanes) {
    for (var i = 0u; i < BLOCK * BLOCK; i++) {
        acc[i] = 0.0;
    }
}

// acc[r * BLOCK + q] += sum over the 16 staged steps of a[tile_row(r)] * b[tile_col(q)].
fn accumulate_tile(lanes: Lanes) {
    for (var s = 0u; s < 16u; s++) {
        var a: array<f32, BLOCK>;
        var b: array<f32, BLOCK>;
        for (var q = 0u; q < BLOCK; q++) {
            a[q] = a_tile[s * TILE_ROWS + tile_row(lanes, q)];
            b[q] = b_tile[s * TILE_COLS + tile_col(lanes, q)];
        }
        for (var r = 0u; r < BLOCK; r++) {
            for (var q = 0u; q < BLOCK; q++) {
                acc[r * BLOCK + q] = fma(a[r], b[q], acc[r * BLOCK + q]);
            }
        }
    }
}

// After the last accumulate_tile (every invocation calls it: the coop version has a barrier).
fn end_tile(lanes: Lanes) {}

// The tile's row tile_row(r), column tile_col(q): the invocation's share of the output.
fn tile_value(lanes: Lanes, r: u32, q: u32) -> f32 {
    return acc[r * BLOCK + q];
}
