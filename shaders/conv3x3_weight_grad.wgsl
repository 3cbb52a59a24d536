// Weight and bias gradients of a 3x3 'same' convolution, stride 1, as a split GEMM:
//   part[s, o, k] = sum over columns n of slice s of dy[o, n] * col[k, n],
//   col[(c, u, v), (b, i, j)] = x[b, c, i + u - 1, j + v - 1] (0 outside the image), and one
//   extra row col[c_in*9, n] = 1, so column k = c_in*9 of the result is the bias gradient.
// M = c_out rows, K = c_in*9 + 1 columns, the reduction over N = batch*h*w columns of dy is cut
// into slices of `slice` columns (a multiple of 16), one slice per workgroup z index; the
// caller sums the slices. Each workgroup computes a TM x TK tile of one slice's M x K result
// (the header's TILE_ROWS x TILE_COLS), each of its 256 invocations a BLOCK x BLOCK block in
// registers (gemm_tile.wgsl), or its subgroups
// cooperative matrices (gemm_tile_coop.wgsl); N is walked 16 at a time through workgroup
// memory, so no loop runs longer than slice/16 iterations.
//
// Bindings (f32, contiguous NCHW): x, dy (the output gradient), gate (dy's shape: the
// forward's ReLU output), part ([slices, c_out, c_in*9 + 1]), info = [batch, c_in, c_out, h, w,
// slice, flags]; flags: 1 dy counts only where gate > 0 (the ReLU's gradient), 2 both operands
// rounded to f16 (mixed precision; round_f16 is shaders/f16.wgsl's).

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> gate: array<f32>;
@group(0) @binding(3) var<storage, read_write> part: array<f32>;
@group(0) @binding(4) var<storage, read_write> info: array<u32>;

const TM: u32 = TILE_ROWS;
const TK: u32 = TILE_COLS;
const TN: u32 = 16u;

// a_tile[nn * TM + mm] = dy[m0 + mm, n], b_tile[nn * TK + kk] = col[k0 + kk, n] for the staged
// columns n = n0 + nn (declared in gemm_tile.wgsl).

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
    let slice = info[5];
    let gated = (info[6] & 1u) != 0u;
    let f16 = (info[6] & 2u) != 0u;
    let hw = h * w;
    let n_total = batch * hw;
    let k_conv = c_in * 9u;
    let k_total = k_conv + 1u;
    let k0 = wg.x * TK;
    let m0 = wg.y * TM;
    let n_begin = wg.z * slice;
    let n_end = min(n_begin + slice, n_total);
    // The invocation's column of each staged step is the same in all its loads (nn = lid % TN,
    // as 256 is a multiple of TN) and advances by TN columns a step, so its pixel (image b, row
    // i, column j) is divided out once here and then carried: runtime-divisor divisions in the
    // loop cost more than the tile's products.
    let nn = lid % TN;
    var b = (n_begin + nn) / hw;
    var i = ((n_begin + nn) % hw) / w;
    var j = (n_begin + nn) % w;
    begin_tile(lanes);

    for (var n0 = n_begin; n0 < n_end; n0 += TN) {
        let n = n0 + nn;
        let p = i * w + j;
        // Tile element e: column nn = e % 16 (consecutive invocations read consecutive
        // pixels), row e / 16; dy's TM rows, then the image columns' TK rows.
        for (var l = 0u; l < TM / 16u; l++) {
            let row = (lid + l * 256u) / TN;
            let m = m0 + row;
            var a = 0.0;
            if (n < n_end && m < c_out) {
                let at = (b * c_out + m) * hw + p;
                a = dy[at];
                if (gated && !(gate[at] > 0.0)) {
                    a = 0.0;
                }
                if (f16) {
                    a = round_f16(a);
                }
            }
            a_tile[nn * TM + row] = stage(a);
        }
        for (var l = 0u; l < TK / 16u; l++) {
            let row = (lid + l * 256u) / TN;
            let k = k0 + row;
            var v = 0.0;
            if (n < n_end && k < k_total) {
                if (k == k_conv) {
                    v = 1.0;
                } else {
                    let c = k / 9u;
                    let r = k % 9u;
                    // Unsigned arithmetic: row i + u - 1 is valid when i + u >= 1 and i + u <= h.
                    let iy = i + r / 3u;
                    let ix = j + r % 3u;
                    if (iy >= 1u && iy <= h && ix >= 1u && ix <= w) {
                        v = x[((b * c_in + c) * h + (iy - 1u)) * w + (ix - 1u)];
                        if (f16) {
                            v = round_f16(v);
                        }
                    }
                }
            }
            b_tile[nn * TK + row] = stage(v);
        }
        workgroupBarrier();
        accumulate_tile(lanes);
        workgroupBarrier();
        // The next step's pixel, TN columns on (TN / w + 1 rows at most, so a few iterations).
        j += TN;
        while (j >= w) {
            j -= w;
            i += 1u;
        }
        while (i >= h) {
            i -= h;
            b += 1u;
        }
    }
    end_tile(lanes);

    let base = wg.z * c_out * k_total;
    for (var r = 0u; r < BLOCK; r++) {
        let m = m0 + tile_row(lanes, r);
        if (m >= c_out) {
            continue;
        }
        for (var q = 0u; q < BLOCK; q++) {
            let k = k0 + tile_col(lanes, q);
            if (k < k_total) {
                part[base + m * k_total + k] = tile_value(lanes, r, q);
            }
        }
    }
}
