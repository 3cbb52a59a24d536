#!/usr/bin/env python3
"""Steps, epochs and images to target for the large-batch study's runs (docs/large-batch.md).

    python3 docs/large-batch/summarize.py docs/large-batch/runs/*  [--loss -0.6,-0.65] [--dice 0.9]

Reads each run directory's metrics.jsonl and summary.json (written by `ctseg train`). The
training-loss criterion is the first step whose trailing 5-step mean loss is <= the target (as
`ctseg report`'s Table 1); the Dice criterion is the first validation (one per epoch) with liver
Dice >= the target. "Collapses" counts validations whose liver Dice fell more than 0.3 below
the best liver Dice of the run so far (the instability of a too-high learning rate). Prints a Markdown table and, for `ctseg bench model
--steps-to-target`, the GLOBAL_BATCH=STEPS pairs of the fastest run per global batch.
"""
import argparse
import json
import os


def load(run):
    steps, vals = [], []
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a torn last line
            (steps if r.get("kind") == "step" else vals).append(r)
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    return steps, vals, summary


def first_loss_step(steps, target, window=5):
    for i in range(len(steps)):
        w = [s["loss"] for s in steps[max(0, i - window + 1): i + 1]]
        if sum(w) / len(w) <= target:
            return steps[i]["step"]
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--loss", default="-0.6,-0.65")
    ap.add_argument("--dice", type=float, default=0.9)
    a = ap.parse_args()
    losses = [float(x) for x in a.loss.split(",")]
    head = ["run", "global batch", "steps/epoch"]
    head += [f"steps (epochs) to loss <= {t}" for t in losses]
    head += [f"steps (epochs) to val Dice liver >= {a.dice}", "collapses", "final val Dice liver / tumour", "wall (s)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    best = {}
    for run in a.runs:
        steps, vals, s = load(run)
        spe = s.get("steps_per_epoch") or 1
        gb = s["global_batch"]
        cells = [s.get("label") or os.path.basename(run), str(gb), str(spe)]
        for t in losses:
            k = first_loss_step(steps, t)
            cells.append("not reached" if k is None else f"{k} ({k / spe:.1f})")
        hit = next((v for v in vals if v["dice_liver"] >= a.dice), None)
        cells.append("not reached" if hit is None else f"{hit['step']} ({hit['epoch']})")
        collapses, top = 0, 0.0
        for v in vals:
            if v["dice_liver"] < top - 0.3:
                collapses += 1
            top = max(top, v["dice_liver"])
        cells.append(str(collapses))
        cells.append(f"{s['dice_liver']:.3f} / {s['dice_tumour']:.3f}")
        cells.append(f"{s['wall_s']:.0f}")
        print("| " + " | ".join(cells) + " |")
        k = first_loss_step(steps, losses[0])
        if k is not None and (gb not in best or k < best[gb]):
            best[gb] = k
    print()
    print("steps-to-target (loss <= %g): %s" % (losses[0], ",".join(f"{b}={k}" for b, k in sorted(best.items()))))


if __name__ == "__main__":
    main()
