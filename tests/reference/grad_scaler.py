"""Reference for ctseg's dynamic loss scaling (src/train/scaler.rs): PyTorch's own update rule.

Run:  python3 tests/reference/grad_scaler.py FLAGS     (FLAGS: one character per step, 1 when
that step's gradients held an Inf or NaN, 0 when they were finite)

torch.amp.GradScaler itself with its defaults (init_scale 2^16, growth_factor 2,
backoff_factor 0.5, growth_interval 2000), on the CPU, driving a real optimiser. Prints one JSON
object: per step the scale and growth tracker after update(), and whether optimizer.step() was
applied.
"""

import json
import sys

import torch

# One parameter and plain SGD (lr 1), the loss `param` (gradient 1) or `param * Inf` on a step
# that is to overflow, scaled and backpropagated as GradScaler's users do; step() unscales, finds
# any Inf and then skips optimizer.step(), update() moves the scale. Applied = the parameter moved.
param = torch.nn.Parameter(torch.zeros(1))
opt = torch.optim.SGD([param], lr=1.0)
scaler = torch.amp.GradScaler("cpu")
out = {"init_scale": float(scaler.get_scale()), "scale": [], "tracker": [], "applied": []}
for c in sys.argv[1]:
    before = param.detach().clone()
    opt.zero_grad()
    loss = (param * (float("inf") if c == "1" else 1.0)).sum()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    out["scale"].append(float(scaler.get_scale()))
    out["tracker"].append(int(scaler._growth_tracker.item()))
    out["applied"].append(not torch.equal(before, param.detach()))
print(json.dumps(out))
