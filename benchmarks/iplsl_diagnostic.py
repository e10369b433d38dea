# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""What does each IPLSL component do to a trained model's few-shot prediction? (issue 9, item 5)

Loads IPLSLNet weights saved by the protocol benchmark (``benchmarks/iplsl.py ... --save_models``) and segments the
1-shot queries of the benchmark (the A-slab and scan B, support crops of scan A outside the slab, as the benchmark
draws them) with the trained network and with one inference-time component switched off at a time:

- query-guided self-learning (``self_weight`` 0: the interacted support prototypes segment the query);
- prototype interaction (support and query prototypes passed through unchanged);
- low-level boundary fusion (no boundary head);
- peak prototypes (``peak_fraction`` 1: the high level's peak prototype becomes the mean of the class);
- background parts (one background prototype instead of ``num_background_prototypes``).

The weights stay the trained ones, so this shows what each component does to this model's output, not what
training without it would give. Per organ: Dice and predicted / true volume, restricted to the body as the
bundle's inference does. Writes ``<out>/iplsl_diagnostic.{json,md}``.

    python benchmarks/iplsl.py --setting 1 --patch 32 --iterations 500 --seeds 0 --networks IPLSLNet \\
        --eval_points 1 --save_models --out /tmp/ipd_out --workdir /tmp/ipd
    python benchmarks/iplsl_diagnostic.py --weights /tmp/ipd/IPLSLNet_seed0.pt --setting 1 --patch 32
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from monai.transforms import Compose

from monai_proto.apps.benchmark.metrics import reference_scores, score_prediction
from monai_proto.apps.benchmark.runner import dump_json, make_parser
from monai_proto.apps.benchmark.splits import load_splits
from monai_proto.transforms import SelectLabelsd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iplsl import CONFIG, REPO, make_predictor_factory, support_crops  # noqa: E402


def variants(net: torch.nn.Module) -> dict:
    """name -> a function that switches one component off on ``net`` and returns the function that restores it."""

    def attribute(name: str, value):
        def switch():
            old = getattr(net, name)
            setattr(net, name, value)
            return lambda: setattr(net, name, old)

        return switch

    def no_interaction():
        net.interact = lambda prototypes, query, valid: (prototypes, query)  # an instance attribute shadows it
        return lambda: delattr(net, "interact")

    return {
        "trained network": lambda: lambda: None,
        "self-learning off": attribute("self_weight", 0.0),
        "interaction off": no_interaction,
        "boundary fusion off": attribute("boundary_head", None),
        "peak prototypes -> mean": attribute("peak_fraction", 1.0),
        "one background prototype": attribute("num_background_prototypes", 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="IPLSLNet weights saved by benchmarks/iplsl.py --save_models")
    ap.add_argument("--setting", type=int, choices=(1, 2), default=1)
    ap.add_argument("--patch", type=int, default=None, help="the benchmark run's --patch")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides: dict = {"setting": args.setting}
    if args.patch:
        overrides["patch_size"] = [args.patch] * 3
    parser = make_parser(CONFIG, overrides)
    organs = list(parser.get_parsed_content("test_organs"))
    class_ids = [int(c) for c in parser.get_parsed_content("test_classes")]
    crops = {"ct": support_crops(parser, organs)}
    deterministic = parser.get_parsed_content("train#deterministic_transforms")
    deterministic = [deterministic] if callable(deterministic) else list(deterministic)
    splits = load_splits(
        Compose([*deterministic, SelectLabelsd("label", class_ids)]),
        parser.get_parsed_content("dataset_dir"),
        parser.get_parsed_content("pixdim"),
        {"A-slab 1-shot": "validation", "B 1-shot": "test"},
        {"A-slab 1-shot": {"shots": 1, "support": "ct"}, "B 1-shot": {"shots": 1, "support": "ct"}},
    )
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(args.weights, weights_only=True))
    net.eval()
    predict = make_predictor_factory(crops, organs)(parser, None)
    results: dict = {}
    for name, switch in variants(net).items():
        restore = switch()
        results[name] = {}
        for split in splits:
            scores = score_prediction(predict(net, split), split, organs, restrict=True)
            results[name][split.name] = {
                "mean_dice": round(float(scores["mean_dice"]), 3),
                "dice": {o: round(float(scores["dice"][o]), 3) for o in organs},
                "volume_ratio": {o: round(float(scores["volume_ratio"][o]), 2) for o in organs},
            }
        restore()
        print(name, {s: r["mean_dice"] for s, r in results[name].items()}, flush=True)
    references = {s.name: reference_scores(s, organs)["body_mask"] for s in splits}
    os.makedirs(args.out, exist_ok=True)
    dump_json(os.path.join(args.out, "iplsl_diagnostic.json"), {"weights": args.weights, **vars(args), **results})
    lines = [
        f"# What each IPLSL component does to a trained model's 1-shot prediction (setting {args.setting})",
        "",
        f"Command: `python benchmarks/iplsl_diagnostic.py --weights <IPLSLNet_seed0.pt> --setting {args.setting}"
        + (f" --patch {args.patch}" if args.patch else "")
        + "`, the weights of `benchmarks/iplsl.py ... --save_models`; one component switched off at inference at a "
        "time, the trained weights unchanged. Dice per organ (predicted / true volume), restricted to the body.",
    ]
    for split in splits:
        body = references[split.name]
        lines += ["", f"## {split.name}", "", "| inference | " + " | ".join(organs) + " | mean |"]
        lines.append("|---|" + "---|" * (len(organs) + 1))
        for name, rows in results.items():
            r = rows[split.name]
            cells = [f"{r['dice'][o]:.3f} ({r['volume_ratio'][o]:.2f}x)" for o in organs]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | **{r['mean_dice']:.3f}** |")
        cells = [f"{float(body['dice'][o]):.3f}" for o in organs]
        lines.append("| body mask | " + " | ".join(cells) + f" | {float(body['mean_dice']):.3f} |")
    with open(os.path.join(args.out, "iplsl_diagnostic.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", os.path.join(args.out, "iplsl_diagnostic.md"))


if __name__ == "__main__":
    main()
