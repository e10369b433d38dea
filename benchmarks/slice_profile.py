# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Where in the held-out slab does a protocol run's network fail? Dice slice by slice (issue 10).

A protocol run with ``--resume`` keeps every training run, its final prediction of each split included, in
``<workdir>/runs/<network>_seed<seed>.pt`` (``monai_proto.apps.benchmark.harness.save_run``). This script reads those
predictions (no training, no inference) and scores scan A's slices one by one: the labelled slices next to the
A-slab (fit: their labels trained the networks) and every slice of the A-slab (held out), each with its distance in
slices from the nearest labelled slice. Per slice: the mean over the organs present of Dice, and the share of the
body's background voxels that the network labels as an organ, restricted to the body as the bundles' inference does.

    python benchmarks/mpcl.py --resume --workdir W ...         # the protocol run
    python benchmarks/slice_profile.py --workdir W --out docs/benchmarks --name mpcl_slices
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re

import numpy as np
import torch
from monai.transforms import Compose

from monai_proto.apps.benchmark.metrics import score_prediction
from monai_proto.apps.benchmark.runner import dump_json, make_parser
from monai_proto.apps.benchmark.splits import EvaluationSplit, load_splits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "bundles", "mpcl_semisupervised_segmentation", "configs", "train.json")


def slice_scores(prediction: torch.Tensor, split: EvaluationSplit, z: int, organs: list[str]) -> dict:
    """Axial slice ``z`` of a ``(*S)`` class map scored as the harness scores a split (restricted to the body), and
    the share of the body's background voxels in that slice predicted as any organ."""
    region = torch.zeros_like(split.region)
    region[..., z] = True
    scores = score_prediction(prediction, dataclasses.replace(split, region=region), organs, restrict=True)
    background = split.body[..., z] & (split.label[0, 0, ..., z] == 0)
    painted = float((prediction[..., z][background] > 0).sum()) / max(1, int(background.sum()))
    return {"mean_dice": float(scores["mean_dice"]), "background_painted": painted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="the --workdir of a protocol run made with --resume")
    ap.add_argument("--config", default=CONFIG, help="the bundle config the run trained (its grid and labels)")
    ap.add_argument("--labelled", type=int, nargs=2, default=(78, 89), help="first and last labelled slice")
    ap.add_argument("--slices", type=int, nargs=2, default=(72, 101), help="first and last slice to profile")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks"))
    ap.add_argument("--name", default="mpcl_slices")
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(args.workdir, "runs", "*_seed*.pt")))
    if not files:
        raise SystemExit(f"{args.workdir}/runs holds no stored run: run the protocol benchmark with --resume there.")
    parser = make_parser(args.config, {})
    organs = list(parser.get_parsed_content("organs"))
    deterministic = parser.get_parsed_content("train#deterministic_transforms")
    deterministic = [deterministic] if callable(deterministic) else list(deterministic)
    split = load_splits(
        Compose(deterministic), parser.get_parsed_content("dataset_dir"), parser.get_parsed_content("pixdim")
    )[0]
    held = sorted({int(z) for z in torch.nonzero(split.region)[:, 2].tolist()})
    lo, hi = args.labelled
    slices = list(range(args.slices[0], args.slices[1] + 1))
    runs: dict[str, dict[int, list]] = {}
    for path in files:
        network, seed = re.match(r"(.+)_seed(\d+)\.pt$", os.path.basename(path)).groups()
        record = torch.load(path, weights_only=True)
        prediction = record["run"]["prediction"]["A-slab"].long()
        scores = [slice_scores(prediction, split, z, organs) for z in slices]
        runs.setdefault(network, {})[int(seed)] = scores
    rows = []
    for i, z in enumerate(slices):
        distance = 0 if lo <= z <= hi else min(abs(z - lo), abs(z - hi))
        kind = "fit" if lo <= z <= hi else ("held out" if z in held else "unlabelled")
        row = {"slice": z, "kind": kind, "distance": distance}
        for network, seeds in runs.items():
            row[network] = {
                key: [seeds[s][i][key] for s in sorted(seeds)] for key in ("mean_dice", "background_painted")
            }
        rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    dump_json(os.path.join(args.out, f"{args.name}.json"), {"workdir": args.workdir, "rows": rows})
    names = list(runs)
    lines = [
        f"# Dice slice by slice on scan A ({args.name})",
        "",
        f"Command: `python benchmarks/slice_profile.py --workdir <the run's workdir> --name {args.name}`, the stored "
        "final predictions of a protocol run made with `--resume` (no new training or inference), restricted to the "
        f"body. Labelled slices {lo}-{hi} (fit), the A-slab {held[0]}-{held[-1]} (held out). Per slice: mean Dice over "
        "the organs present (mean over seeds) / share of the body's background voxels labelled as an organ.",
        "",
        "| slice | kind | distance | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for row in rows:
        cells = []
        for network in names:
            dice, painted = np.nanmean(row[network]["mean_dice"]), np.mean(row[network]["background_painted"])
            cells.append(f"{dice:.2f} / {painted:.2f}")
        lines.append(f"| {row['slice']} | {row['kind']} | {row['distance']} | " + " | ".join(cells) + " |")
    lines += ["", "Means over slices (each slice's mean over the organs present; mean over seeds):", ""]
    for kind in ("held out", "unlabelled"):
        chosen = [row for row in rows if row["kind"] == kind]
        if not chosen:
            continue
        cells = [
            f"{network} {np.nanmean([np.nanmean(r[network]['mean_dice']) for r in chosen]):.3f}" for network in names
        ]
        lines.append(f"- {kind} ({len(chosen)} slices): " + ", ".join(cells))
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
