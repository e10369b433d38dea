# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Benchmark: IAPL against its backbone alone (MONAI ``UNet`` or ``SwinUNETR``), side by side in one run.

Both networks are trained by the IAPL bundle's own training config (same data pipeline, windows, iterations,
optimiser and seed) on scan A of the embedded demo data; only ``network_def`` and ``loss`` differ (the
backbone alone is MONAI's own network with MONAI's ``DiceCELoss``). The final checkpoint of each (no model
selection) is evaluated by sliding windows on scan B (a different scan: cross-scan) and on scan A (the
training scan: within-scan), Dice and HD95 per organ. Inference time and peak memory of the sliding-window
pass over scan B are measured for both in the same run, each in a fresh subprocess (peak RSS on CPU, peak
allocated memory on GPU).

Writes ``docs/benchmarks.md`` (table), ``docs/benchmark_iapl.png`` (plot) and ``docs/benchmark_iapl.json``.

    python benchmarks/iapl_vs_backbone.py                  # default: the bundle's CPU budget
    python benchmarks/iapl_vs_backbone.py --iterations 40  # a quick look
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "bundles", "iapl_segmentation", "configs", "train.json")


def baseline_network(parser, backbone: str) -> dict:
    """MONAI's own network of the same width as IAPL's backbone."""
    kwargs = parser.get_parsed_content("backbone_kwargs")
    common = {"spatial_dims": 3, "in_channels": "@in_channels", "out_channels": "@num_classes"}
    if backbone == "unet":
        return {
            "_target_": "monai.networks.nets.UNet",
            **common,
            "channels": kwargs["channels"],
            "strides": kwargs["strides"],
            "num_res_units": kwargs["num_res_units"],
            "norm": "instance",
        }
    return {"_target_": "monai.networks.nets.SwinUNETR", **common, "feature_size": kwargs.get("feature_size", 24)}


def make_parser(model: str, args: argparse.Namespace, root: str):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(CONFIG)
    parser["bundle_root"] = root
    parser["device"] = f"$torch.device('{args.device}')"
    parser["amp"] = args.device.startswith("cuda")
    parser["epochs"] = 1
    parser["iterations_per_epoch"] = args.iterations
    parser["val_interval"] = 10**6  # no validation: no model selection on the test scan
    parser["seed"] = args.seed
    if args.backbone == "swinunetr":
        parser["backbone"] = "swinunetr"
        parser["backbone_kwargs"] = {"feature_size": args.feature_size}
        parser["patch_size"] = [args.patch] * 3
    if model == "backbone":
        parser["network_def"] = baseline_network(parser, args.backbone)
        parser["loss"] = {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True}
    else:
        parser["filter_ramp_epochs"] = 1
    # the handlers keep the final checkpoint and the loss log; the ramp only exists for IAPL
    handlers = parser["train"]["handlers"]
    parser["train"]["handlers"] = [
        h for h in handlers if h["_target_"] in ("CheckpointSaver", "StatsHandler")
    ] + ([] if model == "backbone" else [dict(h) for h in handlers if h["_target_"] == "RampHandler"])
    if model != "backbone":  # ramp over iterations: the benchmark is one long epoch
        for h in parser["train"]["handlers"]:
            if h["_target_"] == "RampHandler":
                h["per_iteration"] = True
                h["length"] = max(1, args.iterations // 3)
    return parser


def train(model: str, args: argparse.Namespace, root: str) -> dict:
    from monai.utils import set_determinism

    parser = make_parser(model, args, root)
    set_determinism(seed=args.seed)
    trainer = parser.get_parsed_content("train#trainer")
    losses: list[float] = []
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    start = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - start
    return {"train_seconds": seconds, "seconds_per_iteration": seconds / args.iterations, "losses": losses}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure_worker(model: str, args_dict: dict, root: str, image_file: str, queue) -> None:
    """Time and memory of sliding-window inference, alone in a fresh process so that RSS means something."""
    torch.set_num_threads(args_dict["threads"])
    args = argparse.Namespace(**args_dict)
    parser = make_parser(model, args, root)
    network = parser.get_parsed_content("network_def").to(args.device).eval()
    inferer = parser.get_parsed_content("validate#inferer")
    image = torch.from_numpy(np.load(image_file)).to(args.device)
    cuda = args.device.startswith("cuda")
    with torch.no_grad():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        rss_before = _rss_mb()
        inferer(image, network)  # first pass: memory high-water mark (and warm-up)
        if cuda:
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            inferer(image, network)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    result = {"inference_seconds": float(np.median(times)), "peak_memory_mb": float(peak)}
    windows = torch.randn(4, image.shape[1], *parser["patch_size"], device=image.device)
    if model == "iapl":
        result["profile"] = profile_iapl(network, windows)
    else:
        with torch.no_grad():
            network(windows)
            start = time.perf_counter()
            for _ in range(3):
                network(windows)
            result["window_seconds"] = (time.perf_counter() - start) / 3
    queue.put(result)


def profile_iapl(network, windows: torch.Tensor, repeats: int = 3) -> dict:
    """Seconds per batch of windows spent in each part of IAPLNet (where the time goes)."""
    from monai_proto.networks.layers import masked_average_pooling
    from monai_proto.networks.nets.iapl import _area_downsample

    def timed(fn):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        return (time.perf_counter() - start) / repeats, out

    with torch.no_grad():
        t_all, _ = timed(lambda: network(windows))
        t_backbone, feats = timed(lambda: network.backbone(windows))
        maps = [feats.bottleneck, *feats.decoder]
        t_decoder, preds = timed(lambda: network.decoder([maps[i] for i in network.decoder_stages]))

        def ipp():
            weights = _area_downsample(preds[-1].confidence, feats.bottleneck.shape[2:])
            return masked_average_pooling(network.instance_proj(feats.bottleneck), weights)

        t_ipp, instance = timed(ipp)
        common = network.get_common_prototypes()
        descriptors = network.descriptor_norm(torch.cat([instance, common.unsqueeze(0).expand_as(instance)], dim=-1))
        t_input, head_in = timed(lambda: network.head_input(feats.decoder[-1]))
        t_head, _ = timed(lambda: network.head(head_in, descriptors))
    return {
        "windows": list(windows.shape),
        "total": t_all,
        "backbone (MONAI UNet layers, feature_channels at full res)": t_backbone,
        "k-means decoder (3 stages x 2 blocks)": t_decoder,
        "IPP pooling": t_ipp,
        "head input (conv, norm, act at full res)": t_input,
        "dynamic head (per-class point-wise layers at full res)": t_head,
    }



def evaluate(model: str, args: argparse.Namespace, root: str) -> dict:
    """Dice/HD95 per organ on scans B and A with the final checkpoint, then time and memory in a subprocess."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric
    from monai.networks.utils import one_hot

    parser = make_parser(model, args, root)
    network = parser.get_parsed_content("network_def").to(args.device)
    state = torch.load(os.path.join(root, "models", "model_final.pt"), map_location=args.device, weights_only=True)
    network.load_state_dict(state["model"])
    network.eval()
    inferer = parser.get_parsed_content("validate#inferer")
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    num_classes = parser.get_parsed_content("num_classes")
    datasets = {
        "B (cross-scan)": parser.get_parsed_content("validate#datalist")[0],
        "A (training scan)": parser.get_parsed_content("train#datalist")[0],
    }
    result: dict = {"dice": {}, "hd95": {}}
    for name, item in datasets.items():
        data = preprocessing(dict(item))
        image = data["image"].unsqueeze(0).to(args.device)
        label = data["label"].unsqueeze(0).to(args.device)
        with torch.no_grad():
            logits = inferer(image, network)
        pred = one_hot(logits.argmax(1, keepdim=True), num_classes, dim=1)
        gt = one_hot(label.long(), num_classes, dim=1)
        dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(pred, gt)
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(pred, gt)
        result["dice"][name] = [float(v) for v in dice[0].cpu()]
        result["hd95"][name] = [float(v) for v in hd[0].cpu()]
        if name.startswith("B"):
            np.save(os.path.join(root, "scanB_image.npy"), image.cpu().numpy())
            result["voxels"] = int(np.prod(image.shape[2:]))
            np.savez_compressed(
                os.path.join(root, "overlay.npz"),
                image=data["image"][0].cpu().numpy(),
                label=data["label"][0].cpu().numpy(),
                pred=logits.argmax(1)[0].cpu().numpy(),
            )
    result["parameters"] = sum(p.numel() for p in network.parameters())
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_measure_worker, args=(model, vars(args), root, os.path.join(root, "scanB_image.npy"), queue)
    )
    proc.start()
    result.update(queue.get())
    proc.join()
    return result


def write_report(results: dict, args: argparse.Namespace, organs: list[str], roots: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = os.path.join(REPO, "docs")
    os.makedirs(docs, exist_ok=True)
    iapl, base = results["iapl"], results["backbone"]
    throughput_ratio = base["inference_seconds"] / iapl["inference_seconds"]
    memory_ratio = iapl["peak_memory_mb"] / base["peak_memory_mb"]
    backbone_name = "MONAI UNet" if args.backbone == "unet" else "MONAI SwinUNETR"

    def fmt(v: float) -> str:
        return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"

    lines = [
        "# Benchmarks",
        "",
        "## IAPL vs. its backbone alone",
        "",
        f"Command: `python benchmarks/iapl_vs_backbone.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Hardware: {platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads, "
        f"device `{args.device}`; torch {torch.__version__}. Date: {time.strftime('%Y-%m-%d')}.",
        "",
        f"Both trained by `bundles/iapl_segmentation/configs/train.json` on scan A only: {args.iterations} iterations "
        f"x {results['num_samples']} crops of {results['patch_size']}, AdamW lr {results['lr']}, seed {args.seed}, "
        "intensity augmentation as in the bundle; the final checkpoint of each is evaluated (no model selection). "
        f"IAPL: `IAPLNet` on the `{args.backbone}` backbone; baseline: {backbone_name} of the same width with "
        "`DiceCELoss`. Labels are TotalSegmentator's own predictions, not manual annotations.",
        "",
        "### Dice per organ (final checkpoints)",
        "",
        "Scan B is a different scan (contrast-enhanced upper-abdomen slab) than the training scan A "
        "(non-contrast): **cross-scan**. Scan A figures are **within-scan** (the training scan itself) and "
        "only show how well each network fits.",
        "",
        "| organ | IAPL B (cross-scan) | backbone B (cross-scan) | IAPL A (within) | backbone A (within) |",
        "|---|---|---|---|---|",
    ]
    for i, organ in enumerate(organs):
        lines.append(
            f"| {organ} | {fmt(iapl['dice']['B (cross-scan)'][i])} | {fmt(base['dice']['B (cross-scan)'][i])} | "
            f"{fmt(iapl['dice']['A (training scan)'][i])} | {fmt(base['dice']['A (training scan)'][i])} |"
        )
    for key, label in (("B (cross-scan)", "B"), ("A (training scan)", "A")):
        results[f"mean_{label}"] = {m: float(np.nanmean(results[m]["dice"][key])) for m in ("iapl", "backbone")}
    lines.append(
        f"| **mean** | **{fmt(results['mean_B']['iapl'])}** | **{fmt(results['mean_B']['backbone'])}** | "
        f"**{fmt(results['mean_A']['iapl'])}** | **{fmt(results['mean_A']['backbone'])}** |"
    )
    lines += [
        "",
        "HD95 (voxels of 3 mm) on scan B: "
        + ", ".join(
            f"{o} {fmt(iapl['hd95']['B (cross-scan)'][i])} vs {fmt(base['hd95']['B (cross-scan)'][i])}"
            for i, o in enumerate(organs)
        )
        + " (IAPL vs backbone).",
        "",
        "### Speed and memory (sliding-window inference over scan B, same run)",
        "",
        "| | IAPL | backbone alone | ratio |",
        "|---|---|---|---|",
        f"| training s/iteration | {iapl['seconds_per_iteration']:.2f} | {base['seconds_per_iteration']:.2f} | "
        f"{iapl['seconds_per_iteration'] / base['seconds_per_iteration']:.2f}x time |",
        f"| inference s/volume ({iapl['voxels']} voxels, median of {args.repeats}) | {iapl['inference_seconds']:.2f} | "
        f"{base['inference_seconds']:.2f} | throughput {throughput_ratio:.2f}x (target >= 0.8x) |",
        f"| peak inference memory MB ({'GPU allocated' if args.device.startswith('cuda') else 'RSS growth'}) | "
        f"{iapl['peak_memory_mb']:.0f} | {base['peak_memory_mb']:.0f} | {memory_ratio:.2f}x (target <= 1.3x) |",
        f"| parameters | {iapl['parameters'] / 1e6:.2f} M | {base['parameters'] / 1e6:.2f} M | "
        f"{iapl['parameters'] / base['parameters']:.2f}x |",
        "",
        "### Where IAPL's inference time goes",
        "",
        f"One batch of {iapl['profile']['windows']} windows, seconds (same run; the backbone-alone network: "
        f"{base.get('window_seconds', float('nan')):.3f} s):",
        "",
        "| part | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in iapl["profile"].items() if k != "windows"],
        "",
        "![IAPL vs backbone](benchmark_iapl.png)",
        "",
    ]
    results["throughput_ratio"] = throughput_ratio
    results["memory_ratio"] = memory_ratio
    section = "\n".join(lines)
    path = os.path.join(docs, "benchmarks.md")
    with open(path, "w") as f:
        f.write(section)
    with open(os.path.join(docs, "benchmark_iapl.json"), "w") as f:
        json.dump({k: v for k, v in results.items()}, f, indent=2, default=float)

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    x = np.arange(len(organs))
    for ax, key in zip(axes[:2], ("B (cross-scan)", "A (training scan)")):
        ax.bar(x - 0.2, iapl["dice"][key], 0.4, label="IAPL")
        ax.bar(x + 0.2, base["dice"][key], 0.4, label=backbone_name)
        ax.set_xticks(x, organs, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"Dice, scan {key}")
        ax.legend()
    axes[2].plot(iapl["losses"], label="IAPL (BCE+Dice+aux)")
    axes[2].plot(base["losses"], label=f"{backbone_name} (DiceCE)")
    axes[2].set_title("training loss")
    axes[2].set_xlabel("iteration")
    axes[2].legend()
    overlay = np.load(os.path.join(roots["iapl"], "overlay.npz"))
    overlay_base = np.load(os.path.join(roots["backbone"], "overlay.npz"))
    z = int(np.argmax((overlay["label"] > 0).sum(axis=(0, 1))))
    axes[3].imshow(np.rot90(overlay["image"][:, :, z]), cmap="gray")
    axes[3].contour(np.rot90(overlay["label"][:, :, z]), levels=np.arange(0.5, len(organs) + 1), colors="lime")
    axes[3].contour(np.rot90(overlay["pred"][:, :, z]), levels=np.arange(0.5, len(organs) + 1), colors="red")
    axes[3].contour(
        np.rot90(overlay_base["pred"][:, :, z]), levels=np.arange(0.5, len(organs) + 1), colors="cyan"
    )
    axes[3].set_title("scan B: label (green), IAPL (red), backbone (cyan)")
    axes[3].axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(docs, "benchmark_iapl.png"), dpi=80)
    print(section)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=300, help="training iterations of each network")
    ap.add_argument("--backbone", choices=("unet", "swinunetr"), default="unet")
    ap.add_argument("--feature_size", type=int, default=48, help="SwinUNETR feature size")
    ap.add_argument("--patch", type=int, default=64, help="window size (SwinUNETR: multiple of 32)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed inference passes")
    ap.add_argument("--workdir", default=None, help="where checkpoints go (default: a temporary folder)")
    ap.add_argument(
        "--reuse", action="store_true", help="re-evaluate the checkpoints already in --workdir (training figures kept)"
    )
    args = ap.parse_args()
    args.threads = torch.get_num_threads()
    workdir = args.workdir or tempfile.mkdtemp(prefix="iapl_bench_")
    roots = {m: os.path.join(workdir, m) for m in ("iapl", "backbone")}
    results: dict = {}
    saved = os.path.join(workdir, "training.json")
    if args.reuse:
        with open(saved) as f:
            results = json.load(f)
    else:
        for model in ("iapl", "backbone"):
            print(f"== training {model} for {args.iterations} iterations", flush=True)
            results[model] = train(model, args, roots[model])
            print(f"   {results[model]['seconds_per_iteration']:.2f} s/iteration", flush=True)
        with open(saved, "w") as f:
            json.dump(results, f)
    for model in ("iapl", "backbone"):
        print(f"== evaluating {model}", flush=True)
        results[model].update(evaluate(model, args, roots[model]))
    parser = make_parser("iapl", args, roots["iapl"])
    organs = list(parser.get_parsed_content("organs"))
    results["num_samples"] = parser.get_parsed_content("num_samples")
    results["patch_size"] = parser.get_parsed_content("patch_size")
    results["lr"] = parser.get_parsed_content("learning_rate")
    results["args"] = vars(args)
    write_report(results, args, organs, roots)


if __name__ == "__main__":
    main()
