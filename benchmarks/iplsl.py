# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Few-shot benchmark under the protocol (docs/benchmarks/README.md): IPLSL vs the PANet-style baseline.

Both networks are trained episodically by the IPLSL bundle's own config (same backbone, episodes, optimiser,
budget, seeds) on scan A's training classes outside its held-out slab; the test organs (liver, spleen, stomach)
are never a training class (setting 1: they may appear as background; setting 2: no training patch holds
them). Each test organ is then segmented 1-way from k crops of scan A taken outside the A-slab (k = 1 and 5;
the 1-shot crop is the first of the 5), in the A-slab and in scan B. The support prototypes are computed once
per organ and shot count; the query's features are computed once per volume (whole-volume query pass of
:class:`~monai_proto.inferers.SupportConditionedInferer`).

The organs are predicted by separate 1-way episodes; a voxel that two episodes claim goes to the organ of the
higher foreground probability (the class map is then scored like the supervised benchmarks).

    python benchmarks/iplsl.py --setting 1        # docs/benchmarks/iplsl_setting1.{json,md,png}
    python benchmarks/iplsl.py --setting 2
    python benchmarks/iplsl.py --modality mri     # trained on the MRI; MRI and CT (cross-modality) supports
    python benchmarks/iplsl.py --smoke            # checks the harness only
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from monai.transforms import Compose

from monai_proto.apps.benchmark import NetworkSpec, add_arguments, run_benchmark
from monai_proto.apps.benchmark.runner import make_parser
from monai_proto.apps.benchmark.splits import EvaluationSplit
from monai_proto.data import load_msd_datalist
from monai_proto.networks.utils import unwrap_network
from monai_proto.transforms import SelectLabelsd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "bundles", "iplsl_fewshot_segmentation", "configs", "train.json")
MAX_SHOTS = 5
SUPPORT_SEED = 0  # the same support crops for every network and seed

SMOKE = {
    "pixdim": [6.0, 6.0, 6.0],
    "patch_size": [32, 32, 32],
    "backbone_kwargs": {"feature_channels": 8, "channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1},
    "network_kwargs#embedding_dim": 16,
}

READING = """
- Labels are TotalSegmentator's own predictions, not manual annotations. The test organs were never a training
  class. The support is scan A outside the A-slab (labels inside the slab hidden), so the A-slab query is the
  same scan's unseen part and B is cross-scan.
- The body mask column is the trivial reference (protocol goal: each network at least 0.15 above it on every
  query); the volume ratios (goal 0.5-2x) show whether a network paints the body or misses the organ.
- Each organ is predicted by its own 1-way episode; a voxel claimed by two episodes goes to the more probable
  organ. The 5-shot rule averages the foreground prototypes of the shots and keeps every background part.
- CPU figures (no GPU lent to this task) on 2 shared cores; time ratios are from the same run, interleaved, with the
  support prototypes computed once and cached (the timed pass is the query pass).
"""


READING_MRI = """
- Trained episodically on the embedded MRI's own classes outside its held-out slab (slices 10-13), the test organs
  (liver, spleen, stomach) never a training class. The query is the slab; the support is either the same MRI outside
  the slab (same modality, same patient) or CT scan A (cross-modality: each side through its own preset), the
  setting few-shot papers report as the hardest.
- One MRI of 117 x 91 x 20 voxels: this measures interpolation within one patient, not generalisation.
- The body mask column is the trivial reference (Otsu foreground); the volume ratios show whether a network paints
  the body or misses the organ.
- CPU figures (no GPU lent to this task) on 2 shared cores.
"""

# the MRI's structures outside the test organs with at least 300 labelled voxels (its 'total_mr' label table)
MRI_TRAIN_ORGANS = [
    "kidney_right", "kidney_left", "gallbladder", "pancreas", "duodenum", "small_bowel", "colon", "vertebrae",
    "intervertebral_discs", "spinal_cord", "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein",
    "autochthon_left", "autochthon_right",
]  # fmt: skip


def support_crops(parser, organs: list[str]) -> dict[str, list[dict]]:
    """``MAX_SHOTS`` crops of the parser's training scan (scan A, or the MRI with ``modality`` mri) outside its
    held-out slab, per organ, through its own modality's preprocessing: ``{"image", "label"}`` with the organ as 1,
    the held-out slab as the ignore value and everything else 0."""
    class_ids = [int(c) for c in parser.get_parsed_content("test_classes")]
    transforms = [
        *parser.get_parsed_content("train#deterministic_transforms"),
        parser.get_parsed_content("train#holdout"),
    ]
    item = load_msd_datalist(parser.get_parsed_content("dataset_dir"), "training")[0]
    data = Compose(transforms)(dict(item))
    image = torch.as_tensor(data["image"]).as_subclass(torch.Tensor).float()
    label = torch.as_tensor(data["label"]).as_subclass(torch.Tensor).long()
    ignore = int(parser.get_parsed_content("ignore_index"))
    size = [int(v) for v in parser.get_parsed_content("patch_size")]
    rng = np.random.default_rng(SUPPORT_SEED)
    crops: dict[str, list[dict]] = {}
    for organ, class_id in zip(organs, class_ids):
        voxels = torch.nonzero(label[0] == class_id)
        if voxels.numel() == 0:
            raise ValueError(f"{item['image']} has no voxel of {organ} outside the held-out slab.")
        binary = torch.where(label == ignore, ignore, (label == class_id).long())
        crops[organ] = []
        for index in rng.choice(len(voxels), size=MAX_SHOTS, replace=len(voxels) < MAX_SHOTS):
            centre = voxels[int(index)]
            box = []
            for c, s, n in zip(centre.tolist(), size, label.shape[1:]):
                lo = int(min(max(c - s // 2, 0), max(n - s, 0)))
                box.append(slice(lo, lo + s))
            region = (slice(None), *box)
            crops[organ].append({"image": image[region].clone(), "label": binary[region].clone()})
    return crops


def make_predictor_factory(crops: dict[str, dict[str, list[dict]]], organs: list[str]):
    """Predictors that segment each organ 1-way from ``crops[split.options["support"]][organ][:shots]``."""

    def factory(parser, spec):
        inferer = parser.get_parsed_content("validate#inferer")
        inferer.support_margin = None  # the crops are the support
        cache: dict = {}

        @torch.no_grad()
        def predict(network: torch.nn.Module, split: EvaluationSplit) -> torch.Tensor:
            net = unwrap_network(network)
            was_training = net.training
            net.eval()
            device = next(net.parameters()).device
            shots = int(split.options.get("shots", 1))
            # the query's features are computed once per volume and weights (the 1- and 5-shot splits share them)
            first = next(net.parameters())
            key = (str(split.item.get("image")), id(net), first._version, first.data_ptr())
            if cache.get("key") != key:
                cache["key"], cache["features"] = key, inferer.window(split.image.to(device), net.extract_features)
            features = cache["features"]
            probabilities = []
            for organ in organs:
                chosen = crops[split.options.get("support", "ct")][organ][:shots]
                prototypes = inferer.compute_prototypes(
                    net, [c["image"].to(device) for c in chosen], [c["label"].to(device) for c in chosen]
                )
                logits = net.segment_features(features, prototypes)
                probabilities.append(logits.softmax(dim=1)[:, 1])
            net.train(was_training)
            stacked = torch.stack(probabilities, dim=1)  # (1, K, *S)
            best, which = stacked.max(dim=1, keepdim=True)
            return torch.where(best > 0.5, which + 1, 0).cpu()

        return predict

    return factory


def main() -> None:
    ap = add_arguments(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), 300, 3
    )
    ap.add_argument("--setting", type=int, choices=(1, 2), default=1)
    ap.add_argument("--patch", type=int, default=None, help="episode patch and window size (default: the bundle's)")
    ap.add_argument(
        "--thin_query_prob",
        type=float,
        default=None,
        help="the bundle's thin_query_prob (default: the bundle's own): the share of training queries cut to a thin "
        "slab and padded to the size divisor, as the inferer pads a thin volume such as scan B",
    )
    ap.add_argument(
        "--peak_fraction",
        type=float,
        default=None,
        help="IPLSLNet's peak_fraction (default: the bundle's, the method's 10 %%): the share of the support's voxels, "
        "strongest first, averaged into each peak prototype",
    )
    args = ap.parse_args()
    mri = args.modality == "mri"
    common: dict = {"setting": args.setting}
    if args.patch:
        common["patch_size"] = [args.patch] * 3
    with open(CONFIG) as f:
        shipped = json.load(f)
    suffix, variant_words, method_overrides = "", "", {}  # a probe away from the shipped bundle is named for it
    if args.thin_query_prob is not None and args.thin_query_prob != shipped["thin_query_prob"]:
        common["thin_query_prob"] = args.thin_query_prob
        suffix += f"_thin_query_{args.thin_query_prob:g}"
        variant_words += f", thin queries at p {args.thin_query_prob:g}"
    if args.peak_fraction is not None and args.peak_fraction != shipped["network_kwargs"]["peak_fraction"]:
        method_overrides["network_kwargs#peak_fraction"] = args.peak_fraction  # IPLSLNet only: PANet has no peak
        suffix += f"_peak_{args.peak_fraction:g}"
        variant_words += f", peak fraction {args.peak_fraction:g}"
    if mri:  # the MRI's own training classes (its label table differs from the CT one)
        common["train_organs"] = MRI_TRAIN_ORGANS
    smoke = SMOKE if args.smoke else {}
    base = make_parser(CONFIG, {**common, "modality": args.modality, **smoke})
    organs = list(base.get_parsed_content("test_organs"))
    class_ids = [int(c) for c in base.get_parsed_content("test_classes")]
    crops = {args.modality: support_crops(base, organs)}
    if mri:  # cross-modality: the same organs cut from CT scan A, through the CT preset
        crops["ct"] = support_crops(make_parser(CONFIG, {"setting": args.setting, **smoke}), organs)
    workdir = args.workdir or os.path.join("/tmp", f"bench_iplsl_setting{args.setting}_{args.modality}")
    os.makedirs(workdir, exist_ok=True)
    support_file = os.path.join(workdir, "support_liver_1shot.pt")
    torch.save([crops[args.modality][organs[0]][0]], support_file)  # the timed inferer's fixed support
    args.workdir = workdir
    kwargs = base.get_parsed_content("network_kwargs")
    panet = NetworkSpec(
        "PANetFewShot",
        {
            "network_name": "PANetFewShot",
            "network_kwargs": {"embedding_dim": kwargs["embedding_dim"], "tau": kwargs["tau"]},
        },
    )
    shot_splits, options, notes = {}, {}, {}
    if mri:
        query_words = "Slices 10-13 of the embedded MRI (labels never trained)"
        queries = [("MRI-slab", "validation", query_words, "mri", "the MRI outside the slab")]
        queries.append(("MRI-slab", "validation", query_words, "ct", "CT scan A (cross-modality)"))
    else:
        queries = [
            ("A-slab", "validation", "Slices 90-101 of scan A (labels never trained)", "ct", "scan A outside the slab"),
            ("B", "test", "Scan B (contrast-enhanced, never trained on): cross-scan", "ct", "scan A outside the slab"),
        ]
    for split, section, query_words, source, support_words in queries:
        for shots in (1, MAX_SHOTS):
            name = f"{split} {shots}-shot" + (f", {source.upper()} support" if mri else "")
            shot_splits[name], options[name] = section, {"shots": shots, "support": source}
            notes[name] = f"{query_words}; support: {shots} crop(s) of {support_words}."
    run_benchmark(
        name=f"iplsl_setting{args.setting}{suffix}",
        title=f"IPLSL vs PANet-style few-shot (setting {args.setting}, 1-way, 1- and 5-shot{variant_words})",
        bundle="iplsl_fewshot_segmentation",
        config_file=CONFIG,
        method=NetworkSpec("IPLSLNet", method_overrides),
        baselines=[panet],
        args=args,
        common_overrides=common,
        smoke_overrides=SMOKE,
        differences="`network_name`/`network_kwargs` (IPLSLNet: mean + peak prototypes, 4 background parts, "
        "same-class interaction, guarded self-learning, boundary fusion; PANet-style: one embedding, one "
        "background prototype); both trained with IPLSLLoss (the terms PANet-style has no output for are skipped)",
        split_notes=notes,
        reading=READING_MRI if mri else READING,
        predictor_factory=make_predictor_factory(crops, organs),
        sections=shot_splits,
        split_options=options,
        organs=organs,
        split_transforms=[SelectLabelsd("label", class_ids)],
        timing_split=next(iter(shot_splits)) if mri else "B 1-shot",
        cost_overrides={
            "validate#inferer#support": f"$torch.load({support_file!r}, weights_only=True)",
            "validate#inferer#support_margin": None,
        },
    )


if __name__ == "__main__":
    main()
