# Copyright (c) monai-proto developers. Licensed under the Apache License, Version 2.0.
"""
Few-shot benchmark on the embedded demo data: IPLSL vs the PANet-style baseline (same backbone, budget, seed).

Both networks are trained episodically on scan A's training classes (the held-out organs never labelled,
setting 1 by default), then segment each held-out organ 1-way 1-shot across scans (support A -> query B and
support B -> query A) with the support-conditioned sliding-window inferer. Inference time and peak memory
(resident set growth of a fresh subprocess) are measured against the supervised IAPLNet of the same backbone.

    python benchmarks/iplsl_fewshot.py --iterations 200 --output docs/benchmarks_iplsl.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.metrics import DiceMetric
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    RandAdjustContrastd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
)
from monai.utils import set_determinism

import monai_proto
from monai_proto.data import FewShotEpisodeDataset, demo_data_dir, label_ids_for, load_msd_datalist
from monai_proto.inferers import SupportConditionedInferer
from monai_proto.losses import IPLSLLoss

TRAIN_ORGANS = [
    "kidney_right", "kidney_left", "gallbladder", "pancreas", "duodenum", "small_bowel", "colon", "urinary_bladder",
    "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "iliopsoas_left", "iliopsoas_right",
    "autochthon_left", "autochthon_right", "gluteus_maximus_left", "gluteus_maximus_right", "vertebrae_L1",
    "vertebrae_L3",
]  # fmt: skip
TEST_ORGANS = ["liver", "spleen", "stomach"]
BACKBONE = {"feature_channels": 16, "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2}


def load_volumes() -> dict[str, dict]:
    keys = ["image", "label"]
    tx = Compose([
        LoadImaged(keys), EnsureChannelFirstd(keys), Orientationd(keys, "RAS"),
        Spacingd(keys, (3.0, 3.0, 3.0), mode=("bilinear", "nearest")),
        ScaleIntensityRanged("image", -175.0, 250.0, 0.0, 1.0, clip=True),
    ])  # fmt: skip
    root = demo_data_dir()
    items = {"A": load_msd_datalist(root, "training")[0], "B": load_msd_datalist(root, "test")[0]}
    return {k: tx(v) for k, v in items.items()}


def build(name: str) -> torch.nn.Module:
    common = dict(spatial_dims=3, in_channels=1, backbone="unet", backbone_kwargs=BACKBONE)
    if name == "IPLSLNet":
        return monai_proto.IPLSLNet(out_channels=2, embedding_dim=32, **common)
    if name == "PANetFewShot":
        return monai_proto.PANetFewShot(out_channels=2, embedding_dim=32, **common)
    if name == "IAPLNet":
        return monai_proto.IAPLNet(
            out_channels=7, num_queries=32, query_dim=128, embedding_dim=64, prototype_dim=64, **common
        )
    raise ValueError(f"unknown network {name!r}.")


def train(
    name: str, volumes: dict, iterations: int, patch: int, seed: int, setting: int
) -> tuple[torch.nn.Module, float]:
    set_determinism(seed)
    net = build(name)
    aug = Compose([
        RandScaleIntensityd("image", 0.15, prob=0.5), RandShiftIntensityd("image", 0.15, prob=0.5),
        RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)), RandGaussianNoised("image", prob=0.2, std=0.02),
    ])  # fmt: skip
    dataset = FewShotEpisodeDataset(
        [volumes["A"]], label_ids_for(TRAIN_ORGANS), label_ids_for(TEST_ORGANS), [patch] * 3, iterations,
        setting=setting, patch_transform=aug, seed=seed,
    )  # fmt: skip
    loss_fn = IPLSLLoss()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-5)
    net.train()
    start = time.perf_counter()
    for i in range(iterations):
        ep = dataset[i]
        out = net(ep["image"][None], ep["support_image"][None], ep["support_label"][None].round().long())
        loss = loss_fn(out, ep["label"][None])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (i + 1) % 25 == 0:
            print(f"{name} it {i + 1}/{iterations} loss {loss.item():.3f}", flush=True)
    return net.eval(), time.perf_counter() - start


@torch.no_grad()
def evaluate(net: torch.nn.Module, volumes: dict, patch: int, directions: list[str]) -> tuple[dict, dict]:
    inferer = SupportConditionedInferer([patch] * 3, sw_batch_size=2, support_margin=16)
    dice = DiceMetric(include_background=False)
    scores, predictions = {}, {}
    for organ, class_id in zip(TEST_ORGANS, label_ids_for(TEST_ORGANS)):
        for support, query in (tuple(d) for d in directions):
            s_lbl = (volumes[support]["label"] == class_id).long()[None]
            q_lbl = (volumes[query]["label"] == class_id).long()[None]
            logits = inferer(volumes[query]["image"][None], net, support_image=volumes[support]["image"][None],
                             support_label=s_lbl)  # fmt: skip
            pred = logits.argmax(1, keepdim=True)
            value = dice(torch.nn.functional.one_hot(pred[:, 0], 2).movedim(-1, 1),
                         torch.nn.functional.one_hot(q_lbl[:, 0], 2).movedim(-1, 1))  # fmt: skip
            scores[f"{organ} {support}->{query}"] = float(value.mean())
            predictions[(organ, support, query)] = pred[0, 0].numpy()
    return scores, predictions


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _RSSPeak:
    """Polls the current resident set size in a thread: the peak during a block, whatever happened before it
    (``ru_maxrss`` is a high-water mark of the whole process and misses growth below earlier peaks)."""

    def __enter__(self) -> _RSSPeak:
        import threading

        self.base = self.peak = _rss_mib()
        self._stop = threading.Event()

        def poll() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss_mib())
                self._stop.wait(0.002)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def measure(name: str, patch: int) -> None:
    """Run in a fresh subprocess: inference time and resident-memory growth on scan B (query)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    volumes = load_volumes()
    net = build(name).eval()
    query = volumes["B"]["image"][None]
    rss = _RSSPeak()
    with rss, torch.no_grad():
        start = time.perf_counter()
        if name == "IAPLNet":
            SlidingWindowInferer([patch] * 3, sw_batch_size=2, overlap=0.25, mode="gaussian")(query, net)
            proto_time = 0.0
        else:
            inferer = SupportConditionedInferer([patch] * 3, sw_batch_size=2, support_margin=16)
            lbl = (volumes["A"]["label"] == label_ids_for("liver")[0]).long()[None]
            prototypes = inferer.compute_prototypes(net, volumes["A"]["image"][None], lbl)
            proto_time = time.perf_counter() - start
            inferer(query, net, prototypes=prototypes)
        total = time.perf_counter() - start
    params = sum(p.numel() for p in net.parameters())
    print(json.dumps({"network": name, "seconds": total, "prototype_seconds": proto_time,
                      "peak_rss_growth_mib": rss.peak - rss.base, "parameters": params}))  # fmt: skip


def overlay_plot(volumes: dict, predictions: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [o for o in TEST_ORGANS]
    fig, axes = plt.subplots(len(rows), 4, figsize=(13, 3.3 * len(rows)))
    for r, organ in enumerate(rows):
        class_id = label_ids_for(organ)[0]
        s_lbl = volumes["A"]["label"][0].numpy() == class_id
        q_lbl = volumes["B"]["label"][0].numpy() == class_id
        zs = int(np.argmax(s_lbl.sum((0, 1))))
        zq = int(np.argmax(q_lbl.sum((0, 1))))
        query_slice = volumes["B"]["image"][0, :, :, zq].numpy()
        panels = [
            ("support A + mask", volumes["A"]["image"][0, :, :, zs].numpy(), s_lbl[:, :, zs]),
            ("query B + ground truth", volumes["B"]["image"][0, :, :, zq].numpy(), q_lbl[:, :, zq]),
            ("IPLSL prediction", query_slice, predictions["IPLSLNet"][(organ, "A", "B")][:, :, zq]),
            ("PANet-style prediction", query_slice, predictions["PANetFewShot"][(organ, "A", "B")][:, :, zq]),
        ]  # fmt: skip
        for c, (title, img, mask) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(np.rot90(img), cmap="gray")
            ax.imshow(np.rot90(np.ma.masked_where(mask == 0, mask)), cmap="autumn", alpha=0.5)
            ax.set_title(f"{organ}: {title}", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200, help="training episodes per network")
    parser.add_argument("--patch", type=int, default=48, help="cubic patch / window size (multiple of 16)")
    parser.add_argument("--setting", type=int, default=1, choices=(1, 2))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--directions", default="AB,BA", help="support->query scan pairs, e.g. AB,BA")
    parser.add_argument("--output", default="docs/benchmarks_iplsl.md")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.patch)
        return
    volumes = load_volumes()
    results, predictions, train_time = {}, {}, {}
    for name in ("IPLSLNet", "PANetFewShot"):
        net, train_time[name] = train(name, volumes, args.iterations, args.patch, args.seed, args.setting)
        results[name], predictions[name] = evaluate(net, volumes, args.patch, args.directions.split(","))
        print(name, json.dumps(results[name]), flush=True)
    costs = {}
    for name in ("IAPLNet", "PANetFewShot", "IPLSLNet"):
        out = subprocess.run([sys.executable, __file__, "--measure", name, "--patch", str(args.patch)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        costs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    png = os.path.splitext(args.output)[0] + ".png"
    overlay_plot(volumes, predictions, png)
    keys = list(results["IPLSLNet"])
    lines = [
        "# IPLSL few-shot benchmark (demo data)", "",
        f"Command: `python benchmarks/iplsl_fewshot.py --iterations {args.iterations} --patch {args.patch} "
        f"--setting {args.setting} --seed {args.seed} --directions {args.directions}`", "",
        f"Budget: {args.iterations} training episodes per network (batch 1, {args.patch}^3 patches at 3 mm, "
        "AdamW 1e-3), "
        f"seed {args.seed}, setting {args.setting}, trained on scan A's training classes only; CPU, "
        f"{torch.get_num_threads()} threads. This is a tiny budget on two scans: the figures demonstrate the "
        "pipeline, not the method's attainable accuracy.", "",
        "## 1-way 1-shot Dice per held-out organ (cross-scan: support from one scan, query the other)", "",
        "| episode | IPLSL | PANet-style |", "|---|---|---|",
        *[f"| {k} | {results['IPLSLNet'][k]:.3f} | {results['PANetFewShot'][k]:.3f} |" for k in keys],
        f"| **mean** | **{np.mean(list(results['IPLSLNet'].values())):.3f}** | "
        f"**{np.mean(list(results['PANetFewShot'].values())):.3f}** |", "",
        f"Training time: IPLSL {train_time['IPLSLNet']:.0f} s, PANet-style {train_time['PANetFewShot']:.0f} s.", "",
        "## Inference cost on scan B (query, 3 mm), fresh subprocess each", "",
        "| network | parameters | total s | of which support prototypes s | peak RSS growth MiB |",
        "|---|---|---|---|---|",
        *[f"| {n} | {c['parameters']:,} | {c['seconds']:.2f} | {c['prototype_seconds']:.2f} | "
          f"{c['peak_rss_growth_mib']:.0f} |"
          for n, c in costs.items()],
        "", "IAPLNet: supervised, 7 classes, plain sliding window; the few-shot networks include computing the liver "
        "prototypes from scan A (cropped to the liver + 16 voxels) before segmenting B.", "",
        f"![support, query and predictions]({os.path.basename(png)})", "",
        "Rows: held-out organs; columns: support slice of scan A with its mask, query slice of scan B with the "
        "reference, IPLSL and PANet-style predictions (support A -> query B).",
    ]  # fmt: skip
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.output)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump({"dice": results, "costs": costs, "train_seconds": train_time, "args": vars(args)}, f, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
