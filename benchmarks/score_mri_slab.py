# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Score a prediction of the embedded MRI on its held-out slab, with the body-mask reference and volume ratios.

    python -m monai.bundle run training --config_file bundles/iapl_segmentation/configs/train.json --modality mri \\
        --bundle_root /tmp/mri/iapl
    python -m monai.bundle run inference --config_file bundles/iapl_segmentation/configs/inference.json \\
        --modality mri --bundle_root /tmp/mri/iapl
    python benchmarks/score_mri_slab.py /tmp/mri/iapl/eval/mri_mr_seg.nii.gz

The body mask of an MRI is the largest connected component above an Otsu threshold, closed and hole-filled per
slice (fat is bright in this T1-like scan; without filling, the mask misses the organs). Organs are numbered as
the bundle numbers them (1..6 for the default organs); the truth is selected by name from the MRI's own table.
"""

from __future__ import annotations

import argparse
import json

import nibabel as nib
import numpy as np

from monai_proto.apps.benchmark import mri_body_mask
from monai_proto.data import DEFAULT_ORGANS, demo_data_dir, label_ids_for, load_msd_datalist


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prediction", help="the bundle's output for the MRI (NIfTI or NRRD on the MRI's grid)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    folder = demo_data_dir("mri")
    item = load_msd_datalist(folder, "training")[0]
    lo, hi = item["holdout"]["slices"]
    image, label = (np.asarray(nib.as_closest_canonical(nib.load(item[k])).dataobj) for k in ("image", "label"))
    pred = np.asarray(nib.as_closest_canonical(nib.load(args.prediction)).dataobj)
    if pred.shape != label.shape:
        raise ValueError(f"{args.prediction}: shape {pred.shape} differs from the MRI's {label.shape}.")
    body = mri_body_mask(image[None]).numpy()[..., lo:hi]
    rows = {}
    for index, (organ, truth_id) in enumerate(zip(DEFAULT_ORGANS, label_ids_for(list(DEFAULT_ORGANS), folder)), 1):
        truth, predicted = label[..., lo:hi] == truth_id, pred[..., lo:hi] == index
        rows[organ] = {
            "dice": dice(predicted, truth),
            "body_mask_dice": dice(body, truth),
            "volume_ratio": float(predicted.sum() / truth.sum()),
            "body_mask_volume_ratio": float(body.sum() / truth.sum()),
        }
    print(f"held-out slab: slices {lo}-{hi - 1} of the MRI's RAS grid")
    print("| organ | Dice | body mask | predicted/true volume | body mask/true |\n|---|---|---|---|---|")
    for organ, r in rows.items():
        print(
            f"| {organ} | {r['dice']:.3f} | {r['body_mask_dice']:.3f} | {r['volume_ratio']:.2f} "
            f"| {r['body_mask_volume_ratio']:.1f} |"
        )
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in ("dice", "body_mask_dice")}
    print(f"| **mean** | **{mean['dice']:.3f}** | {mean['body_mask_dice']:.3f} | | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"slab": [lo, hi], "organs": rows, "mean": mean}, f, indent=1)


if __name__ == "__main__":
    main()
