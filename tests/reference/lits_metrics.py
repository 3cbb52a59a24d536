"""Independent reference for ctseg's segmentation metrics (src/infer/surface.rs), computed with
medpy.metric.binary, as the LiTS evaluation and most liver/tumour papers computed them.

Usage:
    pip install numpy scipy nibabel medpy          # medpy >= 0.5 (see ASSD below)
    python3 lits_metrics.py TRUTH.nii.gz PRED.nii.gz --structure liver|tumour
    python3 lits_metrics.py TRUTH.npy PRED.npy --npy --spacing 0.7,0.7,2.5 --structure tumour

Inputs are label volumes on the same grid (0 background, 1 liver, 2 tumour; any other value is
an error); liver = label >= 1, tumour = label == 2. NIfTI inputs are read with nibabel and the
voxel spacing is the truth's header zooms (pixdim); the prediction must have the same shape and
zooms. With --npy the inputs are NumPy arrays indexed [x, y, z] (NIfTI voxel order, as nibabel
returns them) and --spacing gives the spacing in mm.

It prints one JSON line, with A = truth, B = prediction (medpy's `result` is B, `reference` A):
    dice        medpy dc(B, A)                     2|A∩B| / (|A|+|B|)
    voe         1 - medpy jc(B, A)                 1 - |A∩B| / |A∪B|
    rvd         medpy ravd(B, A)                   (|B|-|A|) / |A|, signed (despite the name
                                                   "relative absolute", medpy 0.5 keeps the sign)
    precision   medpy precision(B, A)              |A∩B| / |B|
    recall      medpy recall(B, A)                 |A∩B| / |A|
    assd_mm     medpy assd(B, A, spacing)          mean of the surface distances of both
                                                   directions pooled (medpy >= 0.5; medpy <= 0.4
                                                   averaged the two directed means instead, so
                                                   older versions are refused)
    hd95_mm     medpy hd95(B, A, spacing)          numpy.percentile(pooled distances, 95)
    hd_mm       medpy hd(B, A, spacing)            largest surface distance
    asd_truth_mm  medpy asd(A, B, spacing)         mean distance, truth surface -> prediction's
    asd_pred_mm   medpy asd(B, A, spacing)         mean distance, prediction surface -> truth's
plus structure, spacing and the voxel counts. Surfaces are medpy's (connectivity 1: the mask
minus its 6-neighbourhood erosion, outside the volume = background); distances run from surface
voxels to the nearest surface voxel of the other mask, Euclidean in mm between voxel centres.

Empty structures (medpy raises, returns 0, or for Dice under numpy 2 returns NaN there; the
conventions of ctseg are applied):
    both empty:         dice 1, voe 0, distances 0, rvd/precision/recall null
    truth empty only:   dice 0, voe 1, distances null, rvd null, recall null, precision 0
    prediction empty:   dice 0, voe 1, distances null, rvd -1, precision null, recall 0
Precision and recall are null exactly when their denominator is 0; rvd is null without truth.
Exit status: 0 success, 2 bad input.
"""
import argparse
import json
import sys
from importlib.metadata import version

import numpy as np
from medpy.metric import binary

STRUCTURES = {"liver": lambda labels: labels >= 1, "tumour": lambda labels: labels == 2}


def fail(message):
    print(f"lits_metrics.py: {message}", file=sys.stderr)
    sys.exit(2)


def medpy_version_ok():
    parts = version("medpy").split(".")
    return tuple(int(p) for p in parts[:2] if p.isdigit()) >= (0, 5)


def labels_of(array, path):
    """Label values 0/1/2 as uint8; anything else is an error naming the first bad voxel."""
    array = np.asarray(array)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        fail(f"{path}: expected a 3-D volume, got shape {array.shape}")
    bad = ~np.isin(array, (0, 1, 2))
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        fail(f"{path}: voxel {idx} has label {array[idx]}; expected 0, 1 or 2")
    return array.astype(np.uint8)


def read_nifti(path):
    import nibabel as nib

    img = nib.load(path)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return labels_of(np.asanyarray(img.dataobj), path), zooms


def metrics(truth, pred, spacing):
    """The metrics of the boolean masks truth (A) and pred (B) on a grid of `spacing` mm."""
    a, b = truth.astype(bool), pred.astype(bool)
    na, nb, tp = int(np.count_nonzero(a)), int(np.count_nonzero(b)), int(np.count_nonzero(a & b))
    out = {
        # medpy's dc means 1 for two empty masks, but under numpy 2 its 0/0 is a NaN, not a
        # ZeroDivisionError, so the convention is applied here.
        "dice": float(binary.dc(b, a)) if na + nb > 0 else 1.0,
        "voe": 1.0 - float(binary.jc(b, a)),
        "rvd": float(binary.ravd(b, a)) if na > 0 else None,
        "precision": float(binary.precision(b, a)) if nb > 0 else None,
        "recall": float(binary.recall(b, a)) if na > 0 else None,
    }
    keys = ("assd_mm", "hd95_mm", "hd_mm", "asd_truth_mm", "asd_pred_mm")
    if na == 0 and nb == 0:
        out.update({k: 0.0 for k in keys})
    elif na == 0 or nb == 0:
        # medpy raises RuntimeError ("does not contain any binary object"): undefined.
        out.update({k: None for k in keys})
    else:
        kw = {"voxelspacing": spacing, "connectivity": 1}
        out["assd_mm"] = float(binary.assd(b, a, **kw))
        out["hd95_mm"] = float(binary.hd95(b, a, **kw))
        out["hd_mm"] = float(binary.hd(b, a, **kw))
        out["asd_truth_mm"] = float(binary.asd(a, b, **kw))
        out["asd_pred_mm"] = float(binary.asd(b, a, **kw))
    out.update({"truth_voxels": na, "pred_voxels": nb, "overlap_voxels": tp})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("truth")
    p.add_argument("pred")
    p.add_argument("--structure", choices=sorted(STRUCTURES), required=True)
    p.add_argument("--npy", action="store_true", help="inputs are .npy arrays indexed [x, y, z]")
    p.add_argument("--spacing", help="sx,sy,sz in mm (required with --npy; overrides NIfTI zooms)")
    args = p.parse_args()
    if not medpy_version_ok():
        fail(f"medpy {version('medpy')}: need >= 0.5 (earlier assd averaged the directed means)")
    spacing = None
    if args.spacing is not None:
        try:
            spacing = tuple(float(s) for s in args.spacing.split(","))
        except ValueError:
            spacing = ()
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            fail(f"--spacing {args.spacing}: expected three positive numbers sx,sy,sz")
    if args.npy:
        if spacing is None:
            fail("--npy needs --spacing")
        truth = labels_of(np.load(args.truth), args.truth)
        pred = labels_of(np.load(args.pred), args.pred)
    else:
        truth, zooms_t = read_nifti(args.truth)
        pred, zooms_p = read_nifti(args.pred)
        if spacing is None:
            if not np.allclose(zooms_t, zooms_p, rtol=1e-6, atol=0):
                fail(f"voxel spacing differs: truth {zooms_t}, prediction {zooms_p}")
            spacing = zooms_t
    if truth.shape != pred.shape:
        fail(f"shapes differ: truth {truth.shape}, prediction {pred.shape}")
    is_structure = STRUCTURES[args.structure]
    out = {"structure": args.structure, "spacing": list(spacing)}
    out.update(metrics(is_structure(truth), is_structure(pred), spacing))
    print(json.dumps(out, allow_nan=False))


if __name__ == "__main__":
    main()
