// 3x3 'same' convolution, stride 1, with bias and an optional ReLU, as an implicit GEMM:
//   y[b, o, i, j] = act(bias[o] + sum_k w[o, k] * col[k, (b, i, j)]),  k = (c, u, v),
//   col[(c, u, v), (b, i, j)] = x[b, c, i + u - 1, j + v - 1] (0 outside the image).
// The same kernel computes a convolution's input gradient: the convolution of the output
// gradient (x here), zeroed where a gate (the forward's ReLU output) is not positive, by the
// kernel with its channel axes swapped and taps mirrored (read in place: flag 8).
// M = c_out rows, N = batch*h*w columns, K = c_in*9. Each workgroup computes a TM x TN tile of
// y (the header's TILE_ROWS x TILE_COLS); each of its 256 invocations a BLOCK x BLOCK block in
// registers (gemm_tile.wgsl), or its subgroups cooperative matrices
// (gemm_tile_coop.wgsl). K is walked 16 at a time through workgroup
// memory, so no loop runs longer than K/16 iterations (adapters that cap shader loops, such as
// lavapipe at 65,535, are safe up to c_in = 116,000).
//
// Bindings (all f32 contiguous NCHW / OIHW): x, w, bias, y, gate (x's shape), info = [batch,
// c_in, c_out, h, w, flags]; flags: 1 ReLU, 2 add the bias, 4 gate x by gate > 0, 8 w is
// [c_in, c_out, 3, 3] and read swapped and mirrored, 16 both operands rounded to f16 (mixed
// precision's numerics: f16 operands, f32 accumulation; round_f16 is shaders/f16.wgsl's; always
// set with cooperative matrices). Workgroups: x * y grid over (N/TN) * (M/TM) tiles, the M tile
// index in the second dimension.

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> wt: array<f32>;
@group(0) @binding(2) var<storage, read_write> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> gate: array<f32>;
@group(0) @binding(5) var<storage, read_write> info: array<u32>;

const TM: u32 = TILE_ROWS;
const TN: u32 = TILE_COLS;
const TK: u32 = 16u;

// a_tile[kk * TM + mm] = w[m0 + mm, k0 + kk], b_tile[kk * TN + nn] = col[k0 + kk, n0 + nn]
// (declared in gemm_tile.wgsl).

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    lanes: Lanes,
) {
    let lid = lanes.lid;
    let batch = info[0];
    let c_in = info[1];
    let c_out = info[2];
    let h = info[3];
    let w = info[4];
    let flags = info[5];
    let hw = h * w;
    let n_total = batch * hw;
    let k_total = c_in * 9u;
    let n0 = wg.x * TN;
    let m0 = wg.y * TM;
    // The invocation's column of the staged image tile is the same in all its loads (nn = lid %
    // TN, as 256 is a multiple of TN), so its pixel's image, row and column are divided out once
    // here: runtime-divisor divisions in the loop cost more than the tile's products.
    let col = n0 + lid % TN;
    let i = (col % hw) / w;
    let j = col % w;
    let x_image = (col / hw) * c_in * hw;
    begin_tile(lanes);

    for (var k0 = 0u; k0 < k_total; k0 += TK) {
        // Weights: tile element e = kk * TM + mm holds w[m0 + mm, k0 + kk].
        for (var l = 0u; l < TM / 16u; l++) {
            let e = lid + l * 256u;
            let kk = e / TM;
            let mm = e % TM;
            let k = k0 + kk;
            let m = m0 + mm;
            var v = 0.0;
            if (k < k_total && m < c_out) {
                if ((flags & 8u) != 0u) {
                    // w[c, m, 2 - u, 2 - v] of a [c_in, c_out, 3, 3] kernel.
                    v = wt[((k / 9u) * c_out + m) * 9u + 8u - k % 9u];
                } else {
                    v = wt[m * k_total + k];
                }
                if ((flags & 16u) != 0u) {
                    v = round_f16(v);
                }
            }
            a_tile[e] = stage(v);
        }
        // Image columns: tile element e = kk * TN + nn holds col[k0 + kk, n0 + nn].
        for (var l = 0u; l < TN / 16u; l++) {
            let e = lid + l * 256u;
            let k = k0 + e / TN;
            var v = 0.0;
            if (k < k_total && col < n_total) {
                let c = k / 9u;
                let r = k % 9u;
                // Unsigned arithmetic: row i + u - 1 is valid when i + u >= 1 and i + u <= h.
                let iy = i + r / 3u;
                let ix = j + r % 3u;
                if (iy >= 1u && iy <= h && ix >= 1u && ix <= w) {
                    let at = x_image + (c * h + (iy - 1u)) * w + (ix - 1u);
                    v = x[at];
                    if ((flags & 4u) != 0u && !(gate[at] > 0.0)) {
                        v = 0.0;
                    }
                    if ((flags & 16u) != 0u) {
                        v = round_f16(v);
                    }
                }
            }
            b_tile[e] = stage(v);
        }
        workgroupBarrier();
        accumulate_tile(lanes);
        workgroupBarrier();
    }
    end_tile(lanes);

    for (var r = 0u; r < BLOCK; r++) {
        let m = m0 + tile_row(lanes, r);
        if (m >= c_out) {
            continue;
        }
        for (var q = 0u; q < BLOCK; q++) {
            let n = n0 + tile_col(lanes, q);
            if (n >= n_total) {
                continue;
            }
            var v = tile_value(lanes, r, q);
            if ((flags & 2u) != 0u) {
                v += bias[m];
            }
            if ((flags & 1u) != 0u) {
                v = max(v, 0.0);
            }
            let b = n / hw;
            let p = n % hw;
            y[(b * c_out + m) * hw + p] = v;
        }
    }
}
