# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Does training the IAPL bundle on thin crops more often help it segment thin volumes? (issue 8, item 4)

Scan B is 14 slices on the 3 mm grid, and a 14-slice slab of scan A segmented alone loses much of what the whole
volume's prediction finds (``benchmarks/b_diagnostic.py``). The bundle thins a training crop to 8-24 slices with
probability ``thin_slab_prob`` (``RandThinSlabd``, default 0.5). This script trains the bundle's default run (README
command 1: 600 iterations, CPU) for each ``--probs`` value and ``--seeds`` seed, each in its own copy of the bundle,
then scores every model through its own ``run inference`` on:

- the A-slab (slices 90-101 of scan A, labels never trained) inside the whole of scan A;
- the A-slab cut out and segmented alone (12 slices: a held-out thin volume of the training scan's anatomy);
- scan B (cross-scan, 14 slices; the test scan: reported, never used to choose).

Per organ: Dice and predicted / true volume, beside the body mask (the trivial reference). Writes
``<out>/thin_slab_prob.{json,md}``.

    python benchmarks/thin_slab_prob.py --probs 0.5 1.0 --seeds 0 1 --workdir /tmp/thin --out /tmp/thin_out
    python benchmarks/thin_slab_prob.py --score_only ...   # score bundles already trained in --workdir
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from monai_proto.apps.benchmark.runner import dump_json
from monai_proto.data import demo_data_dir, label_ids_for
from monai_proto.transforms import body_mask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from b_diagnostic import ORGANS, REPO, load_ras, save, segment  # noqa: E402

BUNDLE = os.path.join(REPO, "bundles", "iapl_segmentation")
A_SLAB = (90, 102)  # slices of scan A held out by the bundle's default split


def dice_and_volume(pred: np.ndarray, truth: np.ndarray, ids: list[int]) -> dict:
    """Dice and predicted / true volume per organ present in ``truth``, and their mean Dice."""
    rows: dict = {}
    for k, (organ, label) in enumerate(zip(ORGANS, ids), start=1):
        true, predicted = truth == label, pred == k
        if true.any():
            dice = 2.0 * float((true & predicted).sum()) / float(true.sum() + predicted.sum())
            rows[organ] = {"dice": round(dice, 3), "volume_ratio": round(float(predicted.sum() / true.sum()), 2)}
    rows["mean"] = round(float(np.mean([r["dice"] for r in rows.values()])), 3)
    return rows


def body_reference(body: np.ndarray, truth: np.ndarray, ids: list[int]) -> dict:
    """The trivial reference: the body mask given as each organ's prediction (Dice, volume ratio), and the mean."""
    rows: dict = {}
    for k, organ in enumerate(ORGANS, start=1):
        scored = dice_and_volume(np.where(body, k, 0), truth, ids)
        if organ in scored:
            rows[organ] = scored[organ]
    rows["mean"] = round(float(np.mean([r["dice"] for r in rows.values()])), 3)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probs", type=float, nargs="+", default=[0.5, 1.0], help="thin_slab_prob values")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--workdir", default="/tmp/thin_slab_prob", help="one bundle copy per run")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks"))
    ap.add_argument("--score_only", action="store_true", help="score the bundles already trained in --workdir")
    args = ap.parse_args()
    data = demo_data_dir("ct")
    ids = label_ids_for(ORGANS, data)
    a_image, a_affine = load_ras(os.path.join(data, "imagesTr", "scanA_ct.nii.gz"))
    a_truth = load_ras(os.path.join(data, "labelsTr", "scanA_seg.nii.gz"))[0].astype(np.int64)[..., slice(*A_SLAB)]
    b_image, b_affine = load_ras(os.path.join(data, "imagesTs", "scanB_ct_dicom"))
    b_truth = load_ras(os.path.join(data, "labelsTs", "scanB_seg.nii.gz"))[0].astype(np.int64)
    a_body = body_mask(a_image[None]).numpy()[..., slice(*A_SLAB)]  # the same voxels whether cut out or not
    references = {
        "A-slab in scan A": body_reference(a_body, a_truth, ids),
        "A-slab alone": body_reference(a_body, a_truth, ids),
        "B": body_reference(body_mask(b_image[None]).numpy(), b_truth, ids),
    }
    results: dict = {}
    for prob in args.probs:
        for seed in args.seeds:
            bundle = os.path.join(args.workdir, f"p{prob:g}_s{seed}")
            if not args.score_only:
                shutil.rmtree(bundle, ignore_errors=True)
                shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "eval", "logs"))
                cmd = [sys.executable, "-m", "monai.bundle", "run", "training"]
                cmd += ["--config_file", os.path.join(bundle, "configs", "train.json"), "--bundle_root", bundle]
                cmd += ["--thin_slab_prob", str(prob), "--seed", str(seed)]
                subprocess.run(cmd, check=True, capture_output=True)
            with tempfile.TemporaryDirectory() as tmp:
                whole = segment(bundle, save(a_image.astype(np.float32), a_affine, os.path.join(tmp, "a.nii.gz")), tmp)
                cut = a_image[..., slice(*A_SLAB)].astype(np.float32)
                alone = segment(bundle, save(cut, a_affine, os.path.join(tmp, "slab.nii.gz"), A_SLAB[0]), tmp)
                b_pred = segment(bundle, save(b_image.astype(np.float32), b_affine, os.path.join(tmp, "b.nii.gz")), tmp)
            results[f"{prob:g}/{seed}"] = {
                "A-slab in scan A": dice_and_volume(whole[..., slice(*A_SLAB)], a_truth, ids),
                "A-slab alone": dice_and_volume(alone, a_truth, ids),
                "B": dice_and_volume(b_pred, b_truth, ids),
            }
            print(prob, seed, {k: v["mean"] for k, v in results[f"{prob:g}/{seed}"].items()}, flush=True)
    os.makedirs(args.out, exist_ok=True)
    summary = {"probs": args.probs, "seeds": args.seeds, "body_mask": references, **results}
    dump_json(os.path.join(args.out, "thin_slab_prob.json"), summary)
    lines = [
        "# IAPL trained on thin crops more often: thin_slab_prob against thin-volume Dice",
        "",
        f"Command: `python benchmarks/thin_slab_prob.py --probs {' '.join(f'{p:g}' for p in args.probs)} --seeds "
        f"{' '.join(map(str, args.seeds))}`: the bundle's default run (README command 1, 600 iterations, CPU) per "
        "value and seed, each scored through its own `run inference`. Dice per organ (predicted / true volume); the "
        "body mask (above -500 HU, largest component, holes filled) given as every organ is the trivial reference.",
    ]
    for split in ("A-slab in scan A", "A-slab alone", "B"):
        lines += ["", f"## {split}", "", "| thin_slab_prob / seed | " + " | ".join(ORGANS) + " | mean |"]
        lines.append("|---|" + "---|" * (len(ORGANS) + 1))
        for run, scores in results.items():
            rows = scores[split]
            cells = [f"{rows[o]['dice']:.3f} ({rows[o]['volume_ratio']:.2f}x)" if o in rows else "-" for o in ORGANS]
            lines.append(f"| {run} | " + " | ".join(cells) + f" | **{rows['mean']:.3f}** |")
        rows = references[split]
        cells = [f"{rows[o]['dice']:.3f} ({rows[o]['volume_ratio']:.2f}x)" if o in rows else "-" for o in ORGANS]
        lines.append("| body mask | " + " | ".join(cells) + f" | {rows['mean']:.3f} |")
    with open(os.path.join(args.out, "thin_slab_prob.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", os.path.join(args.out, "thin_slab_prob.md"))


if __name__ == "__main__":
    main()
