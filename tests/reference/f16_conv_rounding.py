"""How far f16 operands move one 3x3 convolution + ReLU and its gradients from f32 ones, on the
data of `ctseg bench kernels` (src/bench/kernels.rs, CaseData): the expected differences of its
`spirv` build's rows (burn's f32 kernels against cubek's on f16 operands), tests/spirv.rs.

Run:  python3 tests/reference/f16_conv_rounding.py      (torch 2.x, numpy, CPU)
Both computations in float64 (exact for these sums), one on the values rounded to f16: the
relative L2 differences of the output and of the input and weight gradients under
sum(y * r). Measured with torch 2.15:
  (2, 3, 12, 10) -> 7:     y 2.007e-4, dx 1.088e-2, dw 1.304e-2
  (4, 32, 240, 240) -> 32: y 2.845e-4, dx 1.206e-3, dw 6.10e-5
  (4, 64, 120, 120) -> 64: y 7.087e-4, dx 3.154e-2, dw 1.677e-2
"""
import numpy as np
import torch


def pattern(n, step, period):
    """CaseData's fixed values: ((i * step) % period) / period - 0.5."""
    i = np.arange(n, dtype=np.int64)
    return ((i * step) % period).astype(np.float32) / period - 0.5


def case(b, c, h, w, co):
    x = pattern(b * c * h * w, 7919, 97).reshape(b, c, h, w)
    k = (pattern(co * c * 9, 104_729, 89) / 10).reshape(co, c, 3, 3)
    r = pattern(b * co * h * w, 31, 17).reshape(b, co, h, w)
    out = {}
    for name, cast in [
        ("f32", lambda a: a),
        ("f16", lambda a: a.astype(np.float16).astype(np.float32)),
    ]:
        xt = torch.tensor(cast(x), dtype=torch.float64, requires_grad=True)
        kt = torch.tensor(cast(k), dtype=torch.float64, requires_grad=True)
        y = torch.relu(torch.nn.functional.conv2d(xt, kt, padding=1))
        (y * torch.tensor(r, dtype=torch.float64)).sum().backward()
        out[name] = (y.detach(), xt.grad, kt.grad)

    def rel(i):
        a, b = out["f16"][i], out["f32"][i]
        return float((a - b).norm() / b.norm())

    print(f"{(b, c, h, w)} -> {co}: y {rel(0):.4g}, dx {rel(1):.4g}, dw {rel(2):.4g}")


if __name__ == "__main__":
    case(2, 3, 12, 10, 7)
    case(4, 32, 240, 240, 32)
    case(4, 64, 120, 120, 64)
