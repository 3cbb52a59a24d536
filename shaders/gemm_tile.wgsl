
// The register-blocked tile product both convolution GEMMs share (conv3x3_forward.wgsl and
// conv3x3_weight_grad.wgsl; their sources are f16.wgsl, this file, then the kernel, see
// src/wgsl.rs): a workgroup's 64 x 64 output tile, a 4 x 4 block per invocation in registers,
// summed over 16 reduction steps staged in workgroup memory by the kernel.

// [16][64]: per staged reduction step, the values of the tile's 64 rows (a) and 64 columns (b).
var<workgroup> a_tile: array<f32, 1024>;
var<workgroup> b_tile: array<f32, 1024>;

// acc[r * 4 + q] += sum over the 16 staged steps of a[row 4 ty + r] * b[column 4 tx + q].
fn accumulate_tile(acc: ptr<function, array<f32, 16>>, ty: u32, tx: u32) {
    for (var s = 0u; s < 16u; s++) {
        var a: array<f32, 4>;
        var b: array<f32, 4>;
        for (var q = 0u; q < 4u; q++) {
            a[q] = a_tile[s * 64u + ty * 4u + q];
            b[q] = b_tile[s * 64u + tx * 4u + q];
        }
        for (var r = 0u; r < 4u; r++) {
            for (var q = 0u; q < 4u; q++) {
                (*acc)[r * 4u + q] = fma(a[r], b[q], (*acc)[r * 4u + q]);
            }
        }
    }
}
