"""Reference numbers for ctseg's LARS and LAMB optimisers (src/optim/lars.rs, src/optim/lamb.rs).

Run:  python3 tests/reference/lars_lamb.py        (NumPy; torch optional, for the cross-checks)

An independent NumPy (float64) implementation of both update rules, run for 3 steps on a fixed
3x4 weight and a 3-element bias with fixed gradients per step. It prints JSON; the numbers are
pasted into the unit tests of lars.rs and lamb.rs. The inputs are rounded to float32 first, so
that the Rust tests (float32) start from exactly the same values:
  w0[j]    = 0.5 sin(0.9 j + 0.3)                       j = 0..11 (row-major 3x4)
  b0       = [0.1, -0.2, 0.05]
  gw_t[j]  = 0.3 cos(0.7 j + 1.1 t) + 0.05 t            t = 0, 1, 2 (the step)
  gb_t[j]  = 0.2 sin(1.3 j + 0.4 t + 0.2)               j = 0..2

LARS (You, Gitman & Ginsburg 2017; SimCLR-style LARSOptimizer with eps), per tensor:
  g <- g + wd w ; trust = eta |w| / (|g| + eps) if |w| > 0 and |g| > 0 else 1
  v <- m v + lr trust g ; w <- w - v
LAMB (You et al. 2019, Algorithm 2 with bias correction, phi = identity), per tensor:
  m <- b1 m + (1-b1) g ; v <- b2 v + (1-b2) g^2 ; mh = m/(1-b1^t) ; vh = v/(1-b2^t)
  r = mh/(sqrt(vh) + eps) + wd w ; trust = |w|/|r| if both > 0 else 1 ; w <- w - lr trust r
With exclude_1d, a 1-D tensor gets trust 1 and no weight decay.

Cross-checks against torch (when it is installed), with the trust ratio forced to 1, where the
rules reduce to torch optimisers with a constant lr:
  LARS, trust 1          == torch.optim.SGD(momentum=m, weight_decay=wd, dampening=0)
                            (torch keeps buf = m buf + g and steps lr buf; lr is constant)
  LAMB, trust 1          == torch.optim.AdamW(betas, eps, weight_decay=wd)
                            (w (1 - lr wd) - lr mh/(sqrt(vh)+eps) = w - lr (mh/(sqrt(vh)+eps) + wd w))
  LAMB, 1-D excluded     == torch.optim.Adam(weight_decay=0)
Those pin the momentum/moment bookkeeping and bias correction; the trust ratio itself has no
torch counterpart and is checked only by this script's direct formula.
"""
import json
import math
import sys

import numpy as np

STEPS = 3
LARS_HP = dict(lr=0.5, momentum=0.9, weight_decay=0.05, eta=0.1, eps=1e-8)
LAMB_HP = dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01)


def f32(values):
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def w0():
    return f32([0.5 * math.sin(0.9 * j + 0.3) for j in range(12)]).reshape(3, 4)


def b0():
    return f32([0.1, -0.2, 0.05])


def gw(t):
    return f32([0.3 * math.cos(0.7 * j + 1.1 * t) + 0.05 * t for j in range(12)]).reshape(3, 4)


def gb(t):
    return f32([0.2 * math.sin(1.3 * j + 0.4 * t + 0.2) for j in range(3)])


def norm(x):
    return float(np.sqrt(np.sum(x * x)))


def lars_step(w, g, v, hp, excluded, force_trust_one=False):
    if excluded:
        trust = 1.0
    else:
        g = g + hp["weight_decay"] * w
        wn, gn = norm(w), norm(g)
        trust = hp["eta"] * wn / (gn + hp["eps"]) if wn > 0 and gn > 0 else 1.0
    if force_trust_one:
        trust = 1.0
    v = hp["momentum"] * v + hp["lr"] * trust * g
    return w - v, v


def lamb_step(w, g, state, hp, excluded, force_trust_one=False):
    m, v, t = state
    t += 1
    m = hp["beta1"] * m + (1 - hp["beta1"]) * g
    v = hp["beta2"] * v + (1 - hp["beta2"]) * g * g
    mh = m / (1 - hp["beta1"] ** t)
    vh = v / (1 - hp["beta2"] ** t)
    r = mh / (np.sqrt(vh) + hp["eps"])
    if excluded:
        trust = 1.0
    else:
        r = r + hp["weight_decay"] * w
        wn, rn = norm(w), norm(r)
        trust = wn / rn if wn > 0 and rn > 0 else 1.0
    if force_trust_one:
        trust = 1.0
    return w - hp["lr"] * trust * r, (m, v, t)


def run(kind, exclude_1d, force_trust_one=False):
    """Three steps on (w, b); returns the final (w, b) and the bias after step 1."""
    w, b = w0(), b0()
    if kind == "lars":
        sw, sb = np.zeros_like(w), np.zeros_like(b)
        step = lars_step
    else:
        sw, sb = (np.zeros_like(w), np.zeros_like(w), 0), (np.zeros_like(b), np.zeros_like(b), 0)
        step = lamb_step
    for t in range(STEPS):
        hp = LARS_HP if kind == "lars" else LAMB_HP
        w, sw = step(w, gw(t), sw, hp, excluded=False, force_trust_one=force_trust_one)
        b, sb = step(b, gb(t), sb, hp, excluded=exclude_1d, force_trust_one=force_trust_one)
    return w, b


def torch_checks():
    """Trust-1 reductions against torch optimisers; returns a list of (what, max |diff|)."""
    try:
        import torch
    except ImportError:
        return None

    def trajectory(make, x0, grads):
        p = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
        opt = make([p])
        for g in grads:
            p.grad = torch.tensor(g, dtype=torch.float64)
            opt.step()
        return p.detach().numpy()

    gws, gbs = [gw(t) for t in range(STEPS)], [gb(t) for t in range(STEPS)]
    out = []
    hp = LARS_HP
    w, b = run("lars", exclude_1d=True, force_trust_one=True)
    tw = trajectory(lambda ps: torch.optim.SGD(ps, lr=hp["lr"], momentum=hp["momentum"],
                                               weight_decay=hp["weight_decay"]), w0(), gws)
    tb = trajectory(lambda ps: torch.optim.SGD(ps, lr=hp["lr"], momentum=hp["momentum"]),
                    b0(), gbs)
    out.append(("LARS trust 1 weight vs torch SGD(momentum, weight_decay)", np.abs(w - tw).max()))
    out.append(("LARS excluded bias vs torch SGD(momentum)", np.abs(b - tb).max()))
    hp = LAMB_HP
    betas = (hp["beta1"], hp["beta2"])
    w, _ = run("lamb", exclude_1d=True, force_trust_one=True)
    _, b = run("lamb", exclude_1d=True)
    tw = trajectory(lambda ps: torch.optim.AdamW(ps, lr=hp["lr"], betas=betas, eps=hp["eps"],
                                                 weight_decay=hp["weight_decay"]), w0(), gws)
    tb = trajectory(lambda ps: torch.optim.Adam(ps, lr=hp["lr"], betas=betas, eps=hp["eps"]),
                    b0(), gbs)
    out.append(("LAMB trust 1 weight vs torch AdamW", np.abs(w - tw).max()))
    out.append(("LAMB excluded bias vs torch Adam", np.abs(b - tb).max()))
    return out


def main():
    result = {}
    for kind in ("lars", "lamb"):
        w, b_excl = run(kind, exclude_1d=True)
        w2, b_adapt = run(kind, exclude_1d=False)
        assert np.array_equal(w, w2), "exclude_1d must not change the 2-D weight"
        result[kind] = {
            "w": w.ravel().tolist(),
            "b_exclude_1d": b_excl.tolist(),
            "b_adapted": b_adapt.tolist(),
        }
    checks = torch_checks()
    if checks is None:
        print("torch not installed: cross-checks skipped", file=sys.stderr)
    else:
        for what, diff in checks:
            print(f"{what}: max |diff| {diff:.3e}", file=sys.stderr)
            assert diff < 1e-12, what
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
