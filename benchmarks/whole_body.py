# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""A whole-body-size volume through every bundle's real inference command: time, peak memory, and the output.

Writes a synthetic CT of ``--shape`` voxels (default 512 x 512 x 400 at 0.8 x 0.8 x 1.0 mm, a body-like ellipse
of soft tissue in air, noise) as NIfTI, stand-in weights for each bundle (random, from its ``network_def``: cost
does not depend on them), and runs ``python -m monai.bundle run --config_file <bundle>/configs/inference.json``
on it under ``/usr/bin/time -v`` (peak resident set of the whole process). The bound is the issue's budget:
3 x the input (float32) plus the output probabilities (float32, one map per class on the bundle's grid), plus
the process's own baseline (Python, torch, MONAI: measured as the peak of the same command on a 64^3 volume).

    python benchmarks/whole_body.py --out docs/benchmarks/whole_body

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ["iapl_segmentation", "mpcl_semisupervised_segmentation", "iplsl_fewshot_segmentation"]


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y = np.ogrid[: shape[0], : shape[1]]
    body = ((x - shape[0] / 2) / (0.42 * shape[0])) ** 2 + ((y - shape[1] / 2) / (0.32 * shape[1])) ** 2 <= 1
    vol = np.full(shape, -1000, dtype=np.int16)
    vol[body] = 40
    organ = ((x - shape[0] * 0.45) / (0.1 * shape[0])) ** 2 + ((y - shape[1] * 0.55) / (0.08 * shape[1])) ** 2 <= 1
    vol[organ, shape[2] // 3 : 2 * shape[2] // 3] = 120
    vol += rng.normal(0, 15, shape).astype(np.int16)
    return vol


def dataset(root: Path, shape, spacing) -> None:
    (root / "imagesTs").mkdir(parents=True, exist_ok=True)
    (root / "imagesTr").mkdir(exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(synthetic_ct(shape), affine), str(root / "imagesTs" / "wholebody.nii.gz"))
    small = synthetic_ct((64, 64, 64), seed=1)
    nib.save(nib.Nifti1Image(small, np.diag([3.0, 3.0, 3.0, 1.0])), str(root / "imagesTs" / "small.nii.gz"))
    label = np.zeros((64, 64, 64), np.uint8)
    label[20:40, 20:40, 20:40] = 5  # liver, for the few-shot bundle's support
    nib.save(nib.Nifti1Image(small, np.diag([3.0, 3.0, 3.0, 1.0])), str(root / "imagesTr" / "s.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.diag([3.0, 3.0, 3.0, 1.0])), str(root / "labelsTr" / "s.nii.gz"))
    with open(REPO / "monai_proto" / "data" / "demo" / "dataset.json") as f:
        labels = json.load(f)["labels"]
    item = {"image": "./imagesTr/s.nii.gz", "label": "./labelsTr/s.nii.gz"}
    for name in ("wholebody", "small"):
        content = {"name": "synthetic", "labels": labels, "modality": {"0": "CT"}, "training": [item],
                   "validation": [item], "test": [{"image": f"./imagesTs/{name}.nii.gz"}]}  # fmt: skip
        (root / f"{name}.json").write_text(json.dumps(content))


def run(bundle: str, root: Path, name: str, ckpt: Path, out: Path) -> dict:
    (root / "dataset.json").write_text((root / f"{name}.json").read_text())
    config = REPO / "bundles" / bundle / "configs" / "inference.json"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config),
           "--dataset_dir", str(root), "--ckpt_path", str(ckpt), "--output_dir", str(out / name),
           "--bundle_root", str(out / "root")]  # fmt: skip
    if bundle.startswith("iplsl"):
        cmd += ["--support_class", "liver"]  # the support: the data set's first training scan, its liver
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{bundle} on {name} failed:\n{proc.stderr[-4000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    written = sorted(p for p in (out / name).rglob("*.nii.gz"))
    return {"seconds": seconds, "peak_rss_mb": peak_kb / 1024, "output": str(written[0]) if written else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 400])
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.0])
    ap.add_argument("--bundles", nargs="+", default=BUNDLES)
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "whole_body"))
    args = ap.parse_args(argv)
    shape, spacing = tuple(args.shape), tuple(args.spacing)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"shape": list(shape), "spacing": list(spacing), "device": device,
                    "threads": torch.get_num_threads(), "bundles": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        dataset(root, shape, spacing)
        from monai.bundle import ConfigParser

        import monai_proto  # noqa: F401

        for bundle in args.bundles:
            parser = ConfigParser()
            parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
            parser["dataset_dir"] = str(root)
            (root / "dataset.json").write_text((root / "small.json").read_text())
            net = parser.get_parsed_content("network_def")
            ckpt = Path(tmp) / f"{bundle}.pt"
            torch.save({"model": net.state_dict()}, ckpt)
            grid = [round((n - 1) * s / p) + 1 for n, s, p in zip(shape, spacing, parser.get_parsed_content("pixdim"))]
            classes = int(parser.get_parsed_content("num_classes"))
            base = run(bundle, root, "small", ckpt, Path(tmp) / bundle)
            big = run(bundle, root, "wholebody", ckpt, Path(tmp) / bundle)
            saved = nib.load(big["output"])
            voxels = int(np.prod(shape))
            bound = 3 * voxels * 4 / 2**20 + classes * int(np.prod(grid)) * 4 / 2**20
            row = {
                "baseline_peak_rss_mb": base["peak_rss_mb"],
                "peak_rss_mb": big["peak_rss_mb"],
                "growth_mb": big["peak_rss_mb"] - base["peak_rss_mb"],
                "bound_mb": bound,
                "seconds": big["seconds"],
                "network_grid": grid,
                "classes": classes,
                "output_shape": list(saved.shape),
                "output_spacing": [float(v) for v in saved.header.get_zooms()[:3]],
            }
            result["bundles"][bundle] = row
            print(
                f"{bundle}: {row['seconds']:.0f} s, peak RSS {row['peak_rss_mb']:.0f} MB (64^3 run: "
                f"{row['baseline_peak_rss_mb']:.0f} MB; growth {row['growth_mb']:.0f} MB, bound {bound:.0f} MB), "
                f"output {row['output_shape']} at {row['output_spacing']}",
                flush=True,
            )
            Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    input_mb = int(np.prod(shape)) * 4 / 2**20
    lines = [
        "# A whole-body-size volume through each bundle's inference command",
        "",
        f"`python benchmarks/whole_body.py`: a synthetic CT of {' x '.join(map(str, shape))} voxels at "
        f"{' x '.join(map(str, spacing))} mm ({input_mb:.0f} MB as float32), random weights, "
        f"`python -m monai.bundle run --config_file <bundle>/configs/inference.json` under `/usr/bin/time -v`, "
        f"{result['device']}. Growth is the peak resident set above the same command's on a 64^3 volume (Python, "
        "torch, MONAI, the network); the bound is 3 x the input plus the output probabilities on the bundle's grid.",
        "",
        "| bundle | network grid | seconds | peak RSS MB | 64^3 run MB | growth MB | bound MB | growth / bound "
        "| output shape |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for bundle, r in result["bundles"].items():
        lines.append(
            f"| {bundle} | {'x'.join(map(str, r['network_grid']))} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['baseline_peak_rss_mb']:.0f} | {r['growth_mb']:.0f} | {r['bound_mb']:.0f} | "
            f"{r['growth_mb'] / r['bound_mb']:.2f} | {'x'.join(map(str, r['output_shape']))} |"
        )
    lines.append("")
    Path(args.out + ".md").write_text("\n".join(lines), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
