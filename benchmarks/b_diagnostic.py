# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Why does a trained IAPL bundle miss scan B's organs? Contrast, padding, noise or thin context, one at a time.

A trained bundle (README command 1, or any ``--bundle`` with ``models/model.pt``) segments, through its own
``run inference`` (the user's path, body restriction and all):

- scan B as shipped, and three edits of it: its organs darkened by ``--hu_shift`` HU (contrast-enhanced organs brought
  to scan A's non-contrast levels), its slices extended by replicating the end slices (a thicker volume, cropped
  back), and a Gaussian blur sized for the 1 -> 3 mm resampling (less noise than a plain resampling keeps);
- scan A (its training scan: labels outside the A-slab were trained) whole, and cut into 14-slice slabs, B's
  thickness on the 3 mm grid, each scored against the whole volume's prediction on the same slices.

Per organ: recall (the share of the organ's voxels predicted as it) and predicted / true volume. Writes
``<out>/b_diagnostic.{json,md}``.

    python -m monai.bundle run training --config_file bundles/iapl_segmentation/configs/train.json
    python benchmarks/b_diagnostic.py --out /tmp/b_diag
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import nibabel as nib
import numpy as np
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation
from scipy.ndimage import gaussian_filter

from monai_proto.apps.benchmark.runner import dump_json
from monai_proto.data import demo_data_dir, label_ids_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORGANS = ["spleen", "liver", "stomach", "pancreas", "aorta", "inferior_vena_cava"]


def load_ras(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A volume and its affine, oriented RAS (as every bundle reads it)."""
    volume = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation("RAS")])(path)
    return volume[0].numpy(), volume.affine.numpy()


def save(array: np.ndarray, affine: np.ndarray, path: str, first_slice: int = 0) -> str:
    """``array`` as NIfTI; ``first_slice`` moves the origin along the third axis (for slabs and padding)."""
    moved = affine.copy()
    moved[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, float(first_slice)]) + affine[:3, 3]
    nib.save(nib.Nifti1Image(array, moved), path)
    return path


def segment(bundle: str, image: str, out_dir: str) -> np.ndarray:
    """The bundle's ``run inference`` on one image; the class-index volume, oriented RAS."""
    config = os.path.join(bundle, "configs", "inference.json")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", config]
    cmd += ["--bundle_root", bundle, "--images", f"['{image}']", "--output_dir", out_dir]
    subprocess.run(cmd, check=True, capture_output=True)
    name = os.path.basename(image).replace(".nii.gz", "_seg.nii.gz")
    return load_ras(os.path.join(out_dir, name))[0].astype(np.int64)


def score(pred: np.ndarray, truth: np.ndarray, ids: list[int]) -> dict:
    """Recall and predicted / true volume per organ present in ``truth``."""
    rows = {}
    for k, (organ, label) in enumerate(zip(ORGANS, ids), start=1):
        inside = truth == label
        if inside.any():
            rows[organ] = {
                "recall": round(float((pred[inside] == k).mean()), 3),
                "volume_ratio": round(float((pred == k).sum() / inside.sum()), 2),
            }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=os.path.join(REPO, "bundles", "iapl_segmentation"))
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks"))
    ap.add_argument("--hu_shift", type=float, default=45.0, help="HU taken off B's organs (its contrast)")
    ap.add_argument("--pad_slices", type=int, default=12, help="end slices replicated on each side of B")
    ap.add_argument("--slab", type=int, default=14, help="slices of each slab of scan A (B: 14 at 3 mm)")
    args = ap.parse_args()
    data = demo_data_dir("ct")
    ids = label_ids_for(ORGANS, data)
    b_image, b_affine = load_ras(os.path.join(data, "imagesTs", "scanB_ct_dicom"))
    b_truth = load_ras(os.path.join(data, "labelsTs", "scanB_seg.nii.gz"))[0].astype(np.int64)
    a_image, a_affine = load_ras(os.path.join(data, "imagesTr", "scanA_ct.nii.gz"))
    a_truth = load_ras(os.path.join(data, "labelsTr", "scanA_seg.nii.gz"))[0].astype(np.int64)
    spacing = np.linalg.norm(b_affine[:3, :3], axis=0)
    results: dict = {"bundle": args.bundle, "B": {}, "A": {}}
    with tempfile.TemporaryDirectory() as tmp:
        organs = np.isin(b_truth, ids)
        pad = args.pad_slices
        sigma = [max(0.0, 0.5 * (3.0 / s - 1.0)) for s in spacing]  # a blur sized for the resampling to 3 mm
        darker = np.where(organs, b_image - args.hu_shift, b_image)
        padded = np.pad(b_image, ((0, 0), (0, 0), (pad, pad)), "edge")
        blurred = gaussian_filter(b_image, sigma)
        variants = {
            "as shipped": (b_image, 0, 0),
            f"organs -{args.hu_shift:g} HU": (darker, 0, 0),
            f"{pad} end slices replicated each side": (padded, -pad, pad),
            f"blurred (sigma {sigma[0]:.2f}/{sigma[1]:.2f}/{sigma[2]:.2f} voxels)": (blurred, 0, 0),
        }
        for i, (name, (image, first, crop)) in enumerate(variants.items()):
            path = save(image.astype(np.float32), b_affine, os.path.join(tmp, f"b{i}.nii.gz"), first)
            pred = segment(args.bundle, path, os.path.join(tmp, f"out_b{i}"))
            pred = pred[..., crop : pred.shape[2] - crop] if crop else pred
            results["B"][name] = score(pred, b_truth, ids)
            print("B", name, results["B"][name], flush=True)
        whole = segment(args.bundle, save(a_image.astype(np.float32), a_affine, os.path.join(tmp, "a.nii.gz")), tmp)
        depth = a_image.shape[2]
        for start in range(depth % args.slab, depth, args.slab):
            stop = start + args.slab
            slab = a_image[..., start:stop].astype(np.float32)
            path = save(slab, a_affine, os.path.join(tmp, f"a{start}.nii.gz"), start)
            thin = segment(args.bundle, path, os.path.join(tmp, f"out_a{start}"))
            truth = a_truth[..., start:stop]
            row = {"whole volume": score(whole[..., start:stop], truth, ids), "slab alone": score(thin, truth, ids)}
            if row["whole volume"]:
                results["A"][f"slices {start}-{stop - 1}"] = row
                print("A", start, stop, row, flush=True)
    os.makedirs(args.out, exist_ok=True)
    dump_json(os.path.join(args.out, "b_diagnostic.json"), results)
    lines = [
        "# Why a trained IAPL bundle misses scan B's organs: one cause at a time",
        "",
        f"Command: `python benchmarks/b_diagnostic.py` on the bundle `{os.path.relpath(args.bundle, REPO)}` "
        "(its `models/model.pt`, through its own `run inference`). Per organ: recall / predicted-to-true volume.",
        "",
        "## Scan B and edits of it",
        "",
        "| input | " + " | ".join(ORGANS) + " |",
        "|---|" + "---|" * len(ORGANS),
    ]
    for name, rows in results["B"].items():
        cells = [f"{rows[o]['recall']:.2f} / {rows[o]['volume_ratio']:.2f}x" if o in rows else "-" for o in ORGANS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    title = f"## Scan A in {args.slab}-slice slabs: recall in the whole volume's prediction -> in the slab's alone"
    lines += ["", title, ""]
    lines += ["| slices | " + " | ".join(ORGANS) + " |", "|---|" + "---|" * len(ORGANS)]
    for name, row in results["A"].items():
        cells = []
        for o in ORGANS:
            w, s = row["whole volume"].get(o), row["slab alone"].get(o)
            cells.append(f"{w['recall']:.2f} -> {s['recall']:.2f}" if w and s else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "b_diagnostic.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", os.path.join(args.out, "b_diagnostic.md"))


if __name__ == "__main__":
    main()
