# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Semi-supervised benchmark of MPCL on the embedded demo data, same budget and seed for every method.

Protocol: scan A is labelled only in a slab (a quarter of its superior-inferior extent, centred on the
organs); the rest of A is unlabelled. Scan B (another patient, contrast-enhanced) is never used for training
in any form and is the test scan. Methods, all with ``MPCLNet`` (so the same architecture) and the bundle's
``train.json``:

- ``supervised``: the labelled slab only (lower bound);
- ``mean_teacher``: + the whole of A unlabelled, mean-teacher consistency (MPCL terms off);
- ``mpcl``: + IHPG / PSO / DKA;
- ``fully_supervised``: all of A labelled (upper bound).

Usage: ``python benchmarks/mpcl_semisupervised.py --iterations 200`` (writes docs/benchmarks_mpcl.md + .png).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot
from monai.utils import set_determinism

import monai_proto  # noqa: F401
import monai_proto.engines  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "bundles" / "mpcl_semisupervised_segmentation" / "configs" / "train.json"
METHODS = ("supervised", "mean_teacher", "mpcl", "fully_supervised")
KEEP_HANDLERS = ("RampHandler", "PrototypeBankHandler")


def make_parser(method: str, args: argparse.Namespace, root: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser["bundle_root"] = root
    parser["method"] = "supervised" if method == "fully_supervised" else method
    parser["label_slab_fraction"] = None if method == "fully_supervised" else args.slab_fraction
    parser["epochs"] = 1
    parser["iterations_per_epoch"] = args.iterations
    parser["prototype_init_iteration"] = max(1, args.iterations // 5)
    parser["seed"] = args.seed
    parser["device"] = f"$torch.device('{args.device}')"
    parser["amp"] = args.device.startswith("cuda")
    parser["num_samples"] = args.num_samples
    # no validation on B during training, no checkpoints: B stays unseen until the final evaluation
    parser["train#handlers"] = [h for h in parser["train#handlers"] if h["_target_"] in KEEP_HANDLERS]
    return parser


def evaluate(network: torch.nn.Module, parser: ConfigParser, section: str) -> dict:
    items = monai_proto.data.load_msd_datalist(parser.get_parsed_content("dataset_dir"), section)
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    inferer = parser.get_parsed_content("validate#inferer")
    num_classes = parser.get_parsed_content("num_classes")
    device = parser.get_parsed_content("device")
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    network.eval()
    for item in items:
        data = preprocessing(dict(item))
        with torch.no_grad():
            logits = inferer(data["image"][None].to(device), network)
        pred = one_hot(logits.argmax(1, keepdim=True).cpu(), num_classes)
        label = one_hot(data["label"][None].long().cpu(), num_classes)
        dice(pred, label)
        hd95(pred, label, spacing=parser.get_parsed_content("pixdim"))
    return {"dice": dice.aggregate().mean(0).tolist(), "hd95": hd95.aggregate().mean(0).tolist()}


def run_method(method: str, args: argparse.Namespace, root: str) -> dict:
    parser = make_parser(method, args, os.path.join(root, method))
    set_determinism(seed=args.seed)
    trainer = parser.get_parsed_content("train#trainer")
    start = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - start
    network = parser.get_parsed_content("network")
    result = {
        "train_seconds": seconds,
        "seconds_per_iteration": seconds / args.iterations,
        "scan_B": evaluate(network, parser, "test"),
        "scan_A": evaluate(network, parser, "training"),
        "prototype_diversity": trainer.state.metrics.get("prototype_diversity"),
    }
    print(method, json.dumps(result))
    return result


def write_report(results: dict, args: argparse.Namespace, organs: list[str]) -> None:
    docs = REPO / "docs"
    (docs / "benchmark_mpcl.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    lines = [
        "# MPCL semi-supervised benchmark (demo data)",
        "",
        f"Budget: {args.iterations} iterations per method, batch {args.num_samples} labelled + "
        f"{args.num_samples} unlabelled 64^3 crops, seed {args.seed}, device `{args.device}` "
        f"({torch.get_num_threads()} CPU threads). Command: `python benchmarks/mpcl_semisupervised.py "
        f"--iterations {args.iterations}`.",
        "",
        f"Scan A: only a slab of {args.slab_fraction:.0%} of its superior-inferior extent (centred on the organs) is "
        "labelled, the rest is unlabelled; `fully_supervised` sees all of A's labels. Scan B (contrast-enhanced, "
        "another patient) is never used for training, validation or checkpoint selection: final weights are "
        "evaluated. Cross-scan (B) and within-scan (A, whole volume, slab included) figures are separate.",
        "",
        "**A budget this small is a smoke test of the pipeline, not evidence for or against MPCL.**",
        "",
    ]
    for scan, title in (
        ("scan_B", "Cross-scan: Dice / HD95 (mm) on scan B"),
        ("scan_A", "Within-scan: Dice on scan A"),
    ):
        lines += [
            f"## {title}",
            "",
            "| method | " + " | ".join(organs) + " | mean Dice | s/iter |",
            "|---" * (len(organs) + 3) + "|",
        ]
        for method, r in results.items():
            dice, hd = r[scan]["dice"], r[scan]["hd95"]
            cells = [
                f"{d:.3f}" + (f" / {h:.0f}" if scan == "scan_B" and np.isfinite(h) else "") for d, h in zip(dice, hd)
            ]
            lines.append(
                f"| {method} | " + " | ".join(cells) + f" | {np.mean(dice):.3f} | {r['seconds_per_iteration']:.2f} |"
            )
        lines.append("")
    lines += [
        "Prototype diversity (mean pairwise cosine of a class's prototypes, foreground mean; 1 = collapsed): "
        + ", ".join(
            f"{m} {r['prototype_diversity']:.3f}" for m, r in results.items() if r["prototype_diversity"] is not None
        ),
        "",
    ]
    (docs / "benchmarks_mpcl.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / len(results)
        for i, (method, r) in enumerate(results.items()):
            ax.bar(np.arange(len(organs)) + i * width, r["scan_B"]["dice"], width, label=method)
        ax.set_xticks(np.arange(len(organs)) + 0.4 - width / 2, organs, rotation=20)
        ax.set_ylabel("Dice on scan B")
        ax.set_title(f"MPCL benchmark, {args.iterations} iterations per method")
        ax.legend()
        fig.tight_layout()
        fig.savefig(docs / "benchmarks_mpcl.png", dpi=100)
    except ImportError:
        print("matplotlib not installed: no plot written")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--num_samples", type=int, default=2)
    ap.add_argument("--slab_fraction", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--output", default="/tmp/mpcl_benchmark")
    args = ap.parse_args()
    organs = ConfigParser.load_config_file(str(TRAIN))["organs"]
    results = {m: run_method(m, args, args.output) for m in args.methods}
    write_report(results, args, organs)


if __name__ == "__main__":
    main()
