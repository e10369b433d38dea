# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""IAPL against MONAI's UNet of the same width, under the benchmark protocol (docs/benchmarks/README.md).

Both networks are trained by the IAPL bundle's training config (same pipeline, windows, optimiser and schedule,
augmentation, seeds, and the same loss family: sigmoid BCE + Dice with the held-out labels ignored); only
``network_def`` and ``loss`` differ, and the UNet has no threshold ramp to run. Writes
``docs/benchmarks/iapl.{json,md,png}``.

    python benchmarks/iapl.py                 # protocol run: 2 seeds, curves, A-slab and B
    python benchmarks/iapl.py --smoke         # harness check (a few iterations, coarse grid)
    python benchmarks/iapl.py --modality mri --iterations 600   # the embedded MRI's held-out slab
    python benchmarks/iapl.py --backbone swinunetr --patch 96 --device cuda   # paper-sized setup on a GPU
"""

from __future__ import annotations

import argparse
import json
import os

from monai_proto.apps.benchmark import SAME_WIDTH_UNET, NetworkSpec, add_arguments, run_benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "bundles", "iapl_segmentation", "configs", "train.json")

SMOKE = {
    "pixdim": [6.0, 6.0, 6.0],
    "patch_size": [32, 32, 32],
    "num_samples": 1,
    "backbone_kwargs": {"feature_channels": 8, "channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1},
    "network_def#num_queries": 8,
    "network_def#query_dim": 32,
    "network_def#embedding_dim": 16,
    "network_def#prototype_dim": 16,
}

READING = """
- Labels are TotalSegmentator's own predictions, not manual annotations. The A-slab is 12 slices (36 mm) of the
  training scan whose labels never reached a loss (ignored voxels) and never chose a checkpoint; the rest of
  scan A is context. Scan B is a different, contrast-enhanced scan never seen in training: cross-scan.
- The body mask column is the trivial reference: a network at or below it has not learned where the organ is;
  the volume ratios show over- or under-segmentation at a glance.
- The curves show whether the budget let the baseline flatten; the tables use the final weights of each seed.
- CPU figures (no GPU lent to this task) on 2 shared cores; time ratios are from the same run, interleaved.
"""


READING_MRI = """
- Labels are TotalSegmentator's own predictions on the MRI (its `total_mr` map), not manual annotations. The
  MRI-slab is 4 slices (12 mm) of the one embedded MRI whose labels never reached a loss and never chose a
  checkpoint; the rest of the scan is context. There is no second MRI: nothing here is cross-scan.
- The body mask column (Otsu foreground, holes filled per slice) is the trivial reference; the volume ratios show
  over- or under-segmentation at a glance.
- The curves show whether the budget let the baseline flatten; the tables use the final weights of each seed.
- CPU figures (no GPU lent to this task) on 2 cores that other work (test runs) shared during this run: the
  time ratios are from the same run, interleaved, but noisier than the CT run's.
"""


def main() -> None:
    ap = add_arguments(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), 2000
    )
    ap.add_argument("--backbone", choices=("unet", "swinunetr"), default="unet")
    ap.add_argument("--feature_size", type=int, default=48, help="SwinUNETR feature size")
    ap.add_argument("--patch", type=int, default=None, help="window size (default: the bundle's)")
    args = ap.parse_args()
    with open(CONFIG) as f:
        handlers = json.load(f)["train"]["handlers"]
    common: dict = {}
    if args.patch:
        common["patch_size"] = [args.patch] * 3
    if args.backbone == "swinunetr":
        common["backbone"] = "swinunetr"
        common["backbone_kwargs"] = {"feature_size": args.feature_size}
        unet_def = {
            "_target_": "monai.networks.nets.SwinUNETR",
            "spatial_dims": 3,
            "in_channels": "@in_channels",
            "out_channels": "@num_classes",
            "feature_size": args.feature_size,
        }
        baseline_name = "SwinUNETR"
    else:
        unet_def = SAME_WIDTH_UNET
        baseline_name = "UNet"
    baseline = NetworkSpec(
        baseline_name,
        {
            "network_def": unet_def,
            "loss": {"_target_": "DiceCEIgnoreLoss", "activation": "sigmoid", "ignore_index": "@ignore_index"},
            "train#handlers": [h for h in handlers if h["_target_"] != "RampHandler"],
        },
    )
    run_benchmark(
        name="iapl",
        title=f"IAPL vs MONAI {baseline_name} of the same width (supervised, {args.backbone} backbone)",
        bundle="iapl_segmentation",
        config_file=CONFIG,
        method=NetworkSpec("IAPLNet"),
        baselines=[baseline],
        args=args,
        common_overrides=common,
        smoke_overrides=SMOKE,
        differences=f"`network_def` (IAPLNet on the {args.backbone} backbone vs MONAI {baseline_name}) and `loss` "
        "(IAPLLoss = sigmoid BCE + Dice + 0.05 x deep supervision vs DiceCEIgnoreLoss = the same sigmoid BCE + Dice); "
        "the UNet has no filter-threshold ramp",
        split_notes={
            "A-slab": "Slices 90-101 of scan A (held out: labels never trained); the whole volume is predicted.",
            "B": "Scan B (contrast-enhanced, 20 slices of 2 mm, never trained on): cross-scan.",
            "MRI-slab": "Slices 10-13 of the embedded MRI (117 x 91 x 20 at 3 mm; held out: labels never trained); "
            "the whole volume is predicted; body mask = Otsu foreground.",
        },
        reading=READING_MRI if args.modality == "mri" else READING,
    )


if __name__ == "__main__":
    main()
