# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Does a network trained on a labelled slab fail by anatomy or by where a slice sits in its window? (issue 10)

One window of the patch's depth (64 slices) is placed at several depths of scan A, and each slice is predicted by
the window alone (no sliding-window blending). Per slice and window start: the share of the body's background voxels
labelled as an organ, with the slice's depth inside the window. A network that learned anatomy paints the same
slice alike from every window; one that learned where labels occur in its window paints by window depth.

    python benchmarks/window_position.py --run W/runs/supervised_only_seed0.pt   # a --resume run's stored weights
    python benchmarks/window_position.py --checkpoint models/model_final.pt     # a bundle training's checkpoint
"""

from __future__ import annotations

import argparse
import os

import torch
from monai.transforms import Compose

from monai_proto.apps.benchmark.runner import dump_json, make_parser
from monai_proto.apps.benchmark.splits import load_splits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "bundles", "mpcl_semisupervised_segmentation", "configs", "train.json")


def painted_by_window(
    network: torch.nn.Module, image: torch.Tensor, background: torch.Tensor, starts: list[int], depth: int
) -> dict[int, dict[int, float]]:
    """``{slice: {window start: share of background painted}}`` for one ``(1, C, X, Y, Z)`` image and its ``(X, Y, Z)``
    background mask, each window ``[start, start + depth)`` predicted alone (in-plane padded to a multiple of 16)."""
    x_size, y_size = image.shape[2:4]
    padded = torch.nn.functional.pad(image, (0, 0, 0, (-y_size) % 16, 0, (-x_size) % 16), mode="replicate")
    rows: dict[int, dict[int, float]] = {}
    for start in starts:
        with torch.no_grad():
            output = network(padded[..., start : start + depth])
        logits = output if isinstance(output, torch.Tensor) else output[0]
        prediction = logits.argmax(1)[0, :x_size, :y_size]
        for j in range(prediction.shape[-1]):
            mask = background[..., start + j]
            rows.setdefault(start + j, {})[start] = float((prediction[..., j][mask] > 0).float().mean())
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a stored run of a --resume workdir (<workdir>/runs/<network>_seed<s>.pt)")
    source.add_argument("--checkpoint", help="a bundle checkpoint holding the network under 'model'")
    ap.add_argument("--config", default=CONFIG, help="the bundle config the network was trained with")
    ap.add_argument("--starts", type=int, nargs="+", default=[0, 12, 24, 36, 48], help="window starts (slices)")
    ap.add_argument("--labelled", type=int, nargs=2, default=(78, 89), help="first and last labelled slice")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks"))
    ap.add_argument("--name", default="mpcl_position")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    parser = make_parser(args.config, {})
    network = parser.get_parsed_content("network_def")
    if args.run:
        state = torch.load(args.run, weights_only=True)["run"]["state_dict"]
    else:
        state = torch.load(args.checkpoint, weights_only=True)["model"]
    network.load_state_dict(state)
    network.eval()
    deterministic = parser.get_parsed_content("train#deterministic_transforms")
    deterministic = [deterministic] if callable(deterministic) else list(deterministic)
    split = load_splits(
        Compose(deterministic), parser.get_parsed_content("dataset_dir"), parser.get_parsed_content("pixdim")
    )[0]
    depth = int(parser.get_parsed_content("patch_size")[-1])
    image = split.image if split.image.ndim == 5 else split.image[None]
    background = split.body & (split.label[0, 0] == 0)
    starts = [s for s in args.starts if 0 <= s <= image.shape[-1] - depth]
    rows = painted_by_window(network, image, background, starts, depth)
    source_name = args.run or args.checkpoint
    os.makedirs(args.out, exist_ok=True)
    dump_json(
        os.path.join(args.out, f"{args.name}.json"),
        {"source": source_name, "depth": depth, "starts": starts, "rows": {str(z): v for z, v in rows.items()}},
    )
    lo, hi = args.labelled
    lines = [
        f"# Background painted by window depth ({args.name})",
        "",
        f"Command: `python benchmarks/window_position.py {'--run' if args.run else '--checkpoint'} "
        f"{os.path.basename(source_name)} --name {args.name}`. Scan A on the bundle's grid; one {depth}-slice window "
        "at each start, each slice predicted by that window alone. Per slice: the share of the body's background "
        f"voxels labelled as an organ, and (in brackets) the slice's depth in the window. Labelled slices {lo}-{hi}.",
        "",
        "| slice | " + " | ".join(f"window at {s}" for s in starts) + " |",
        "|---|" + "---|" * len(starts),
    ]
    for z in sorted(rows):
        if z % 2:
            continue
        cells = [f"{rows[z][s]:.2f} ({z - s})" if s in rows[z] else "" for s in starts]
        lines.append(f"| {z} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
