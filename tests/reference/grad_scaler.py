"""Reference for ctseg's dynamic loss scaling (src/train/scaler.rs): PyTorch's own update rule.

Run:  python3 tests/reference/grad_scaler.py FLAGS     (FLAGS: one character per step, 1 when
that step's gradients held an Inf or NaN, 0 when they were finite)

torch.amp.GradScaler's defaults (init_scale 2^16, growth_factor 2, backoff_factor 0.5,
growth_interval 2000), its `update()` done by the same kernel GradScaler calls,
torch._amp_update_scale_, on CPU tensors. A step is applied when its gradients were finite
(GradScaler's step() skips optimizer.step() otherwise). Prints one JSON object: per step the
scale and growth tracker after the update, and whether the step applied.
"""

import json
import sys

import torch

scaler = torch.amp.GradScaler("cpu")
scale = torch.full((1,), scaler.get_scale(), dtype=torch.float32)
tracker = torch.zeros((1,), dtype=torch.int32)
out = {"init_scale": float(scale.item()), "scale": [], "tracker": [], "applied": []}
for c in sys.argv[1]:
    found_inf = torch.full((1,), float(c == "1"), dtype=torch.float32)
    torch._amp_update_scale_(
        scale,
        tracker,
        found_inf,
        scaler.get_growth_factor(),
        scaler.get_backoff_factor(),
        scaler.get_growth_interval(),
    )
    out["scale"].append(float(scale.item()))
    out["tracker"].append(int(tracker.item()))
    out["applied"].append(c == "0")
print(json.dumps(out))
