"""Reference numbers for ctseg's parity tests, computed with PyTorch and the livermask peer model.

Run:  python3 tests/reference/torch_reference.py        (torch 2.x, CPU, float32)
It prints JSON; the numbers are pasted into tests/torch_parity.rs, which states how they were
made. With --grads it prints the loss and every parameter's whole gradient instead, for the
model shape in CTSEG_REF_SHAPE="width,depth,size,batch" (default 4,2,32,2); the Rust test
compares them tensor by tensor at livermask's resolution.

Weights and inputs follow closed-form rules that the Rust test reproduces exactly:
  trainable parameter k (in `model.parameters()` order, which is ctseg's module-visit order of
  trainable tensors), element j:
    conv weight : sqrt(3 / fan_in) * sin(0.37 j + 1.3 k + 0.5)
    conv bias   : 0.05 * sin(0.37 j + 1.3 k + 0.5)
    BN gamma    : 1 + 0.1 * sin(0.37 j + 1.3 k + 0.5)
    BN beta     : 0.1 * sin(0.37 j + 1.3 k + 0.5)
  input x[b, 0, y, x] (flat index j) = 50 sin(0.11 j) + 20 cos(0.023 j) + 30 b
  label, with s = size / 32: liver disc (y-12s)^2 + (x-(13+5b)s)^2 < 64 s^2, tumour
  (y-12s)^2 + (x-15s)^2 < 9 s^2 (inside the liver)
"""
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from livermask_torch import LivermaskUNet, dice_loss  # noqa: E402

W, DEPTH, N, B = (int(v) for v in os.environ.get("CTSEG_REF_SHAPE", "4,2,32,2").split(","))


def fill(model):
    for k, p in enumerate(model.parameters()):
        n = p.numel()
        s = torch.tensor([math.sin(0.37 * j + 1.3 * k + 0.5) for j in range(n)], dtype=torch.float64)
        if p.dim() == 4:
            fan_in = p.shape[1] * p.shape[2] * p.shape[3]
            v = math.sqrt(3.0 / fan_in) * s
        elif getattr(p, "_kind", None) == "gamma":
            v = 1.0 + 0.1 * s
        elif getattr(p, "_kind", None) == "beta":
            v = 0.1 * s
        else:
            v = 0.05 * s
        with torch.no_grad():
            p.copy_(v.reshape(p.shape).float())


def tag(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight._kind = "gamma"
            m.bias._kind = "beta"


def batch():
    j = torch.arange(B * N * N, dtype=torch.float64)
    x = 50 * torch.sin(0.11 * j) + 20 * torch.cos(0.023 * j)
    x = x.reshape(B, 1, N, N) + 30 * torch.arange(B, dtype=torch.float64).reshape(B, 1, 1, 1)
    yy, xx = torch.meshgrid(torch.arange(N), torch.arange(N), indexing="ij")
    yy, xx = yy.double(), xx.double()
    s = N / 32.0
    y = torch.zeros(B, 3, N, N)
    for b in range(B):
        liver = (yy - 12 * s) ** 2 + (xx - (13 + 5 * b) * s) ** 2 < 64 * s * s
        tumour = ((yy - 12 * s) ** 2 + (xx - 15 * s) ** 2 < 9 * s * s) & liver
        y[b, 0] = (~liver).float()
        y[b, 1] = liver.float()
        y[b, 2] = tumour.float()
    return x.float(), y


def unet_reference():
    torch.manual_seed(0)
    model = LivermaskUNet(W, levels=DEPTH, dropout=0.0)
    tag(model)
    fill(model)
    model.train()
    x, y = batch()
    p = model(x)
    loss = dice_loss(p, y)
    loss.backward()
    params = list(model.parameters())
    first_conv = model.enc[0][0].conv
    bott_bn = model.enc[DEPTH][0].bn
    return {
        "loss": loss.item(),
        "pred_mean": p.mean().item(),
        "pred_first": p.flatten()[:4].tolist(),
        "grad_first_conv_w": first_conv.weight.grad.flatten()[:6].tolist(),
        "grad_first_conv_b": first_conv.bias.grad.flatten().tolist(),
        "grad_bottleneck_gamma": bott_bn.weight.grad.flatten()[:4].tolist(),
        "grad_head_w": model.head.weight.grad.flatten()[:6].tolist(),
        "grad_head_b": model.head.bias.grad.flatten().tolist(),
        "grad_norm": torch.sqrt(sum((q.grad.double() ** 2).sum() for q in params)).item(),
        # PyTorch momentum 0.01 = keep 0.99; running_var uses the unbiased batch variance.
        "first_bn_running_mean": model.enc[0][0].bn.running_mean.tolist(),
        "first_bn_running_var": model.enc[0][0].bn.running_var.tolist(),
    }


def adadelta_reference(steps=6):
    # Least squares f(w) = sum((A w - b)^2), A[i, j] = sin(i + 2j + 1), b[i] = cos(3 i), w0[j] = 0.1 j.
    A = torch.tensor([[math.sin(i + 2 * j + 1) for j in range(4)] for i in range(5)], dtype=torch.float32)
    bvec = torch.tensor([math.cos(3 * i) for i in range(5)], dtype=torch.float32)
    w = torch.tensor([0.1 * j for j in range(4)], dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adadelta([w], lr=1.0, rho=0.95, eps=1e-7)
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((A @ w - bvec) ** 2).sum()
        loss.backward()
        opt.step()
        traj.append(w.detach().tolist())
    return {"adadelta_w": traj}


def all_grads():
    torch.manual_seed(0)
    model = LivermaskUNet(W, levels=DEPTH, dropout=0.0)
    tag(model)
    fill(model)
    model.train()
    x, y = batch()
    loss = dice_loss(model(x), y)
    loss.backward()
    return {
        "loss": loss.item(),
        "grads": [q.grad.flatten().tolist() for q in model.parameters()],
    }


if __name__ == "__main__":
    if "--grads" in sys.argv:
        print(json.dumps(all_grads()))
        sys.exit(0)
    out = {"torch": torch.__version__}
    out.update(unet_reference())
    out.update(adadelta_reference())
    print(json.dumps(out, indent=1))
