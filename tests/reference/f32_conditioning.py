"""How far the livermask U-Net's f32 gradients are from f64 ones, and from f32 ones of the
transposed problem (the noise probe of ctseg's GPU check, src/verify.rs).

Run:  python3 tests/reference/f32_conditioning.py      (torch 2.x, CPU)
Model and inputs as in the check: the peer model at 240², depth 4, dropout 0, torch's random
init (seed), x = 0.5 + 0.3 sin(0.013 j) + 0.2 cos(0.0007 j), labels ((j // 7) % 3 == 0).
For each configuration it prints the worst per-tensor relative L2 error of f32 against f64,
the median f32-vs-transposed noise, and the largest ratio error / max(noise, median noise).
Measured with torch 2.15: worst errors 1.1–2.7 %, ratio ≤ 11.7 (ctseg uses 20).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from livermask_torch import LivermaskUNet, dice_loss  # noqa: E402


def grads(dtype, width, batch, seed, transpose=False, n=240, depth=4):
    torch.manual_seed(seed)
    m = LivermaskUNet(width, levels=depth, dropout=0.0).to(dtype)
    m.train()
    if transpose:
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 4:
                    p.copy_(p.transpose(2, 3).clone())
    j = torch.arange(batch * n * n, dtype=torch.float64)
    x = (0.5 + 0.3 * torch.sin(j * 0.013) + 0.2 * torch.cos(j * 0.0007)).reshape(batch, 1, n, n)
    jj = torch.arange(batch * 3 * n * n)
    y = (((jj // 7) % 3) == 0).double().reshape(batch, 3, n, n)
    if transpose:
        x, y = x.transpose(2, 3).contiguous(), y.transpose(2, 3).contiguous()
    loss = dice_loss(m(x.to(dtype)), y.to(dtype))
    loss.backward()
    out = []
    for p in m.parameters():
        g = p.grad.double()
        if transpose and g.dim() == 4:
            g = g.transpose(2, 3)
        out.append(g.flatten())
    return out


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


if __name__ == "__main__":
    for width, batch in ((2, 2), (4, 4), (8, 2)):
        for seed in (0, 1, 2):
            g64 = grads(torch.float64, width, batch, seed)
            g32 = grads(torch.float32, width, batch, seed)
            g32t = grads(torch.float32, width, batch, seed, transpose=True)
            err = [rel(a, b) for a, b in zip(g32, g64)]
            noise = [rel(a, b) for a, b in zip(g32, g32t)]
            med = sorted(noise)[len(noise) // 2]
            ratio = max(e / max(z, med, 1e-12) for e, z in zip(err, noise))
            print(
                f"width {width} batch {batch} seed {seed}: f32 vs f64 worst {max(err):.1e}, "
                f"median {sorted(err)[len(err) // 2]:.1e}; noise median {med:.1e}; "
                f"max ratio {ratio:.1f}"
            )
            sys.stdout.flush()

