# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Semi-supervised benchmark under the protocol (docs/benchmarks/README.md): MPCL against supervised-only, mean
teacher and the fully supervised bound.

Every network is ``MPCLNet`` trained by the MPCL bundle's own ``train.json`` (same pipeline, windows, optimiser,
budget, augmentation, seeds), in the bundle's protocol split (``labeled_region``, issue 10): on scan A (3rd axis,
RAS) only slices 78-89 are labelled (labels elsewhere are the ignore value, the image stays whole); the A-slab
(90-101) is held out; the unlabelled pool is scan A's image with the A-slab blanked (inductive), or the whole of
scan A plus scan B's image (``--variant transductive``, reported as such). What differs:

- ``supervised_only``: the labelled slices alone (``method`` supervised: the unlabelled loader is not read);
- ``mean_teacher``: + the unlabelled pool, mean-teacher consistency (MPCL's prototype terms off);
- ``MPCLNet``: + IHPG / PSO / DKA (``method`` mpcl, the bundle's default);
- ``fully_supervised``: the labels of every slice outside the A-slab (``labeled_region`` None), supervised.

MONAI's ``UNet`` of the backbone's width is measured beside them for cost only (inference throughput, peak
memory, training step; not trained), since all four networks share MPCLNet's architecture. Writes
``docs/benchmarks/mpcl.{json,md,png}`` (``mpcl_transductive.*`` with ``--variant transductive``; ``*_mri.*`` with
``--modality mri``).

    python benchmarks/mpcl.py                          # protocol run: 2 seeds, curves, A-slab and B
    python benchmarks/mpcl.py --variant transductive   # + the A-slab's and B's images in the unlabelled pool
    python benchmarks/mpcl.py --modality mri           # the embedded MRI: labelled slices 6-9, held-out 10-13
    python benchmarks/mpcl.py --smoke                  # checks the harness only
    python benchmarks/mpcl.py --class_quantile off     # one ramped pseudo-label threshold (the bundle's is per class)
    python benchmarks/mpcl.py --class_quantile 0.3 --networks MPCLNet   # another per-class quantile, MPCL only
    python benchmarks/mpcl.py --share_cap 2 --networks MPCLNet  # cap each class at 2x its labelled share
    python benchmarks/mpcl.py --trust_region on --networks MPCLNet  # pseudo-labels near the labelled slices first
    python benchmarks/mpcl.py --trust_region on --trust_radius_end 36 --networks MPCLNet  # ... growing to 36 mm only
    python benchmarks/mpcl.py --labeled_crop_anchor center  # centred labelled crops (the default before 0.4.11)

On the MRI (117 x 91 x 20 at 3 mm, held-out slab 10-13) the labelled slab is slices 6-9 (the bundle's
``labeled_regions#mri``): like scan A's 78-89 it is the slab just inferior to the held-out one, of the same
thickness, and it holds all six organs (spleen 69, liver 2828, stomach 1033, pancreas 543, aorta 127, IVC 91
voxels); the slab above (14-17) holds only 28 pancreas voxels. The unlabelled pool is the rest of the MRI; there
is no second MRI, so ``--variant transductive`` only returns the held-out slab's image to the pool.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable

import torch

from monai_proto.apps.benchmark import SAME_WIDTH_UNET, NetworkSpec, add_arguments, run_benchmark
from monai_proto.networks.nets import MPCLNet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "bundles", "mpcl_semisupervised_segmentation", "configs", "train.json")
ITERATIONS = 600  # 1.5x the protocol's UNet calibration (400): room for supervised-only's A-slab curve to flatten

SMOKE = {
    "pixdim": [6.0, 6.0, 6.0],
    "patch_size": [32, 32, 32],
    "num_samples": 1,
    "backbone_kwargs": {"feature_channels": 8, "channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1},
    "embedding_dim": 16,
    "prototype_init_iteration": 1,  # the bank is initialised and updated within the smoke run's 2 iterations
}

SPLIT_NOTES = {
    "A-slab": "Slices 90-101 of scan A (held out: labels never reach a loss, a bank or a pseudo-label); the whole "
    "volume is predicted.",
    "B": "Scan B (contrast-enhanced, 20 slices of 2 mm, never labelled): cross-scan.",
    "MRI-slab": "Slices 10-13 of the embedded MRI (117 x 91 x 20 at 3 mm; held out); the whole volume is predicted; "
    "body mask = Otsu foreground.",
}

READING = """
- Labels are TotalSegmentator's own predictions, not manual annotations. Only slices 78-89 of scan A are labelled
  (spleen 1060, liver 5030, stomach 869, pancreas 251, aorta 387, IVC 541 voxels); the A-slab (90-101) is 12
  slices whose labels never reached a loss, a prototype bank, a pseudo-label or a model selection. Scan B is a
  different, contrast-enhanced scan: cross-scan.
- {variant}
- The labelled crops see the whole of scan A as context (its unlabelled and held-out voxels carry the ignore
  value), as in every bundle of the protocol; fully_supervised sees the labels of every slice outside the A-slab.
- The body mask column is the trivial reference; the volume ratios show over- or under-segmentation at a glance.
  The issue's goal: MPCL ahead of mean teacher and mean teacher ahead of supervised-only, each beyond the seed
  spread on the A-slab, and MPCL closing at least half of the gap between supervised-only and the bound.
- The curves show whether the budget let supervised-only flatten; the tables use the final weights of each seed.
- All four networks are MPCLNet (same inference cost); MONAI's UNet of the backbone's width is timed beside them
  (not trained). CPU figures on 2 cores unless the header says otherwise.
"""

READING_MRI = """
- Labels are TotalSegmentator's own predictions on the MRI (its `total_mr` map), not manual annotations. Slices 6-9
  are labelled (the slab just inferior to the held-out one, as for scan A); the MRI-slab (10-13) never reached a
  loss, a bank, a pseudo-label or a model selection. There is no second MRI: nothing here is cross-scan.
- {variant}
- The body mask column (Otsu foreground, holes filled per slice) is the trivial reference; the volume ratios show
  over- or under-segmentation at a glance.
- The curves show whether the budget let supervised-only flatten; the tables use the final weights of each seed.
"""

VARIANTS = {
    "inductive": "Inductive: the unlabelled pool is the training scan's image with the held-out slab blanked (the "
    "background value); no image of a test region is an unlabelled sample.",
    "transductive": "Transductive (reported as such, beside the inductive run): the unlabelled pool also holds the "
    "held-out slab's image and, on CT, scan B's image; their labels are never used.",
}


def off_or_number(valid: Callable[[float], bool], meaning: str) -> Callable[[str], float | None]:
    """An argparse type: ``off`` (or ``none``) gives None, else a number for which ``valid`` holds."""

    def parse(value: str) -> float | None:
        if value.lower() in ("off", "none"):
            return None
        number = float(value)
        if not valid(number):
            raise argparse.ArgumentTypeError(f"{meaning} or 'off', got {value}")
        return number

    return parse


class_quantile = off_or_number(lambda q: 0.0 <= q <= 1.0, "a quantile in [0, 1]")  # None: one ramped threshold
share_cap = off_or_number(lambda r: r > 0.0, "a positive multiple of the labelled share")  # None: no cap


def bank_ready(network: torch.nn.Module) -> None:
    """``--cost_only``: mark an MPCLNet's bank as initialised (its random unit prototypes), as training does after
    ``prototype_init_iteration``, so that the timed step computes the PSO terms and the prototype-branch CE."""
    if isinstance(network, MPCLNet):
        network.bank.initialized.fill_(True)


def main() -> None:
    with open(CONFIG) as f:
        config = json.load(f)
    shipped = config["confidence_class_quantile"]
    shipped_cap = config["pseudo_label_share_cap"]
    shipped_alignment = bool(config["distribution_alignment"])
    shipped_trust = bool(config["pseudo_label_trust_region"])
    shipped_anchor = config["labeled_crop_anchor"]
    ap = add_arguments(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), ITERATIONS
    )
    ap.add_argument("--variant", choices=tuple(VARIANTS), default="inductive", help="unlabelled pool (see above)")
    ap.add_argument(
        "--class_quantile",
        type=class_quantile,
        default=shipped,
        help="the bundle's confidence_class_quantile (default: the bundle's own); 'off' for one ramped pseudo-label "
        "threshold, written as <name>_global_threshold.*; another quantile is written as <name>_class_quantile.*",
    )
    ap.add_argument(
        "--share_cap",
        type=share_cap,
        default=shipped_cap,
        help="the bundle's pseudo_label_share_cap (default: the bundle's own): a class's pseudo-labels take at most "
        "this multiple of its labelled share; 'off' for none; another value is written as <name>_share_cap.*",
    )
    ap.add_argument(
        "--distribution_alignment",
        choices=("on", "off"),
        default="on" if shipped_alignment else "off",
        help="the bundle's distribution_alignment (default: the bundle's own); the other value is written as "
        "<name>_alignment_<on|off>.*",
    )
    ap.add_argument(
        "--trust_region",
        choices=("on", "off"),
        default="on" if shipped_trust else "off",
        help="the bundle's pseudo_label_trust_region (default: the bundle's own): pseudo-labels only within a radius "
        "of the labelled slices that grows from trust_radius_start to trust_radius_end mm over the run; the other "
        "value is written as <name>_trust_region_<on|off>.*",
    )
    ap.add_argument(
        "--trust_radius_end",
        type=off_or_number(math.isfinite, "a finite radius in mm"),
        default=float(config["trust_radius_end"]),
        help="the bundle's trust_radius_end in mm (default: the bundle's own), with --trust_region on; another value "
        "is written as <name>_radius_<mm>.*",
    )
    ap.add_argument(
        "--labeled_crop_anchor",
        choices=("center", "random"),
        default=shipped_anchor,
        help="the bundle's labeled_crop_anchor (default: the bundle's own): where the labelled voxel a labelled crop "
        "is drawn around sits in the crop along the slab axis (random: anywhere, RandAnchoredCropd); the other value "
        "is written as <name>_anchor_<center|random>.*",
    )
    args = ap.parse_args()
    alignment = args.distribution_alignment == "on"
    trust = args.trust_region == "on"
    transductive = args.variant == "transductive"
    quantile = args.class_quantile
    common = {
        "confidence_class_quantile": quantile,
        "pseudo_label_share_cap": args.share_cap,
        "distribution_alignment": alignment,
        "pseudo_label_trust_region": trust,
        "trust_radius_end": args.trust_radius_end,
        "labeled_crop_anchor": args.labeled_crop_anchor,
        "label_slab_fraction": None,  # the labelled slices come with the whole image as context
        "labeled_region": "$@labeled_regions[@modality]",
        "transductive": transductive,
        # the MRI data set's test entry is the MRI itself: its held-out slab is the only image to return
        "transductive_sections": [] if args.modality == "mri" else ["test"],
    }
    handlers = config["train"]["handlers"]
    unet = NetworkSpec(
        "UNet",
        {
            "network_def": SAME_WIDTH_UNET,
            "method": "supervised",
            "train#handlers": [h for h in handlers if h["_target_"] != "PrototypeBankHandler"],
        },
    )
    variant = "" if args.variant == "inductive" else f"_{args.variant}"
    if quantile != shipped:
        variant += "_global_threshold" if quantile is None else "_class_quantile"
    thresholds = f"per-class pseudo-label thresholds at q {quantile}"
    thresholds = "one ramped pseudo-label threshold" if quantile is None else thresholds
    if args.share_cap != shipped_cap:
        variant += "_share_cap"
    if args.share_cap is not None:
        thresholds += f", class share cap {args.share_cap:g}x"
    if alignment != shipped_alignment:
        variant += f"_alignment_{args.distribution_alignment}"
    if alignment:
        thresholds += ", distribution alignment"
    if trust != shipped_trust:
        variant += f"_trust_region_{args.trust_region}"
    if trust and args.trust_radius_end != float(config["trust_radius_end"]):
        variant += f"_radius_{args.trust_radius_end:g}"
    if args.labeled_crop_anchor != shipped_anchor:
        variant += f"_anchor_{args.labeled_crop_anchor}"
    if args.labeled_crop_anchor == "random":
        thresholds += ", labelled crops anchored at random depths"
    if trust:
        thresholds += f", pseudo-label trust region {config['trust_radius_start']:g} -> {args.trust_radius_end:g} mm"
    run_benchmark(
        name=f"mpcl{variant}",
        title=f"MPCL vs supervised-only, mean teacher and the fully supervised bound (semi-supervised, {args.variant}, "
        f"{thresholds})",
        bundle="mpcl_semisupervised_segmentation",
        config_file=CONFIG,
        method=NetworkSpec("MPCLNet", {"method": "mpcl"}),
        baselines=[
            NetworkSpec("supervised_only", {"method": "supervised"}),
            NetworkSpec("mean_teacher", {"method": "mean_teacher"}),
            NetworkSpec("fully_supervised", {"method": "supervised", "labeled_region": None}),
        ],
        args=args,
        common_overrides=common,
        smoke_overrides=SMOKE,
        differences="`method` (supervised for supervised_only and fully_supervised: labelled batches only; "
        "mean_teacher: + EMA-teacher consistency on the unlabelled pool; mpcl: + IHPG prototype bank, PSO and DKA) "
        "and, for fully_supervised, `labeled_region` None (every slice outside the held-out slab labelled); all "
        "MPCLNet, all with MPCLSupervisedLoss (its prototype terms on for mpcl only)",
        split_notes=SPLIT_NOTES,
        reading=(READING_MRI if args.modality == "mri" else READING).format(variant=VARIANTS[args.variant]),
        cost_reference=unet,
        comparisons=[("mean_teacher", "supervised_only")],
        bounds=("supervised_only", "fully_supervised"),
        initial_state=bank_ready,
    )


if __name__ == "__main__":
    main()
