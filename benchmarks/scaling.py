# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""How inference cost grows with the volume: time and peak memory against volume size, every bundle network and
MONAI's ``UNet`` of the same width, in one run.

Each (network, size) pair runs in a fresh process (spawned), so one measurement's allocations never count in
another's. The network and its sliding-window inferer come from the bundle's own ``inference.json`` (random
weights: cost does not depend on them), with windows computed on ``--device`` and stitched on the CPU
(``sw_device=<device>, device="cpu"``), which is what keeps the compute device's memory independent of the volume.
One untimed pass over a 64^3 volume first chooses the kernels and fills the allocator's pools, so that the timed
pass and its memory growth are those of the volume.
The volume is synthetic (normal noise) on the network's own grid, so the size is the number of voxels the network
sees after resampling. Peak memory is the growth of the process's resident set (CPU) or of allocated GPU memory
during one pass, polled every 2 ms; ``bound_mb`` is the issue's budget: 3 x the input plus the output
probabilities (float32).

    python benchmarks/scaling.py --sizes 64 96 128 160 192 --out docs/benchmarks/scaling

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLES = {
    "IAPLNet": "iapl_segmentation",
    "MPCLNet": "mpcl_semisupervised_segmentation",
    "IPLSLNet": "iplsl_fewshot_segmentation",
}
UNET = "UNet (MONAI)"


def _worker(
    name: str, size: tuple[int, ...], device_name: str, threads: int, amp: bool, queue
) -> None:  # pragma: no cover
    try:
        import torch
        from monai.networks.nets import UNet

        import monai_proto  # noqa: F401 - bare _target_ names in the bundle configs
        from monai_proto.apps.benchmark.runner import current_rss_mb, make_parser
        from monai_proto.inferers import FittedSlidingWindowInferer

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        device = torch.device(device_name)
        bundle = BUNDLES["IAPLNet" if name == UNET else name]
        config = str(REPO / "bundles" / bundle / "configs" / "inference.json")
        parser = make_parser(config, {"device": f"$torch.device('{device_name}')"})
        if name == UNET:  # the same width as IAPL's backbone, same window and inferer
            kw = parser.get_parsed_content("backbone_kwargs")
            network = UNet(
                spatial_dims=3,
                in_channels=1,
                out_channels=parser.get_parsed_content("num_classes"),
                channels=kw["channels"],
                strides=kw["strides"],
                num_res_units=kw["num_res_units"],
            )
        else:
            network = parser.get_parsed_content("network_def")
        network = network.to(device).eval()
        kwargs = {}
        if name == "IPLSLNet":  # the bundle's few-shot inferer: support prototypes once, then the query volume
            parser["use_default_support"] = True  # no support data set is read: the prototypes come with the call
            parser["stitch_device"] = "cpu"
            inferer = parser.get_parsed_content("inferer")
            support = torch.randn(1, 1, 48, 48, 48)
            label = torch.zeros(1, 1, 48, 48, 48)
            label[..., 16:32, 16:32, 16:32] = 1
            kwargs["prototypes"] = inferer.compute_prototypes(network, support.to(device), label.to(device))
        else:
            inferer = FittedSlidingWindowInferer(
                roi_size=parser.get_parsed_content("patch_size"),
                divisor=parser.get_parsed_content("size_divisor"),
                sw_batch_size=4,
                overlap=0.25,
                mode="gaussian",
                padding_mode="replicate",
                sw_device=device,
                device="cpu",
            )
        image = torch.randn(1, 1, *size)  # on the CPU: only windows go to the compute device
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            inferer(torch.randn(1, 1, 64, 64, 64), network, **kwargs)  # warm-up: kernels chosen, pools allocated
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base_gpu = torch.cuda.memory_allocated()
            before = current_rss_mb()
            peak = [before]
            stop = threading.Event()

            def poll() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], current_rss_mb())
                    time.sleep(0.002)

            thread = threading.Thread(target=poll, daemon=True)
            thread.start()
            start = time.perf_counter()
            out = inferer(image, network, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            stop.set()
            thread.join()
        result = {
            "seconds": seconds,
            "cpu_peak_mb": max(peak[0], current_rss_mb()) - before,
            "output_shape": list(out.shape),
            "output_device": str(out.device),
        }
        if device.type == "cuda":
            result["gpu_peak_mb"] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
        queue.put(result)
    except Exception as e:  # report instead of hanging the parent
        import traceback

        queue.put({"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})


def measure(name: str, size: tuple[int, ...], device: str, threads: int, amp: bool) -> dict:
    from monai_proto.apps.benchmark.runner import run_in_fresh_process

    return run_in_fresh_process(_worker, (name, size, device, threads, amp), f"{name} at {size}")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in result["networks"].items():
        mvox = [r["voxels"] / 1e6 for r in rows]
        axes[0].plot(mvox, [r["seconds"] for r in rows], "o-", label=name)
        axes[1].plot(mvox, [r["cpu_peak_mb"] for r in rows], "o-", label=name)
    rows = next(iter(result["networks"].values()))
    axes[1].plot(
        [r["voxels"] / 1e6 for r in rows], [r["bound_mb"] for r in rows], "k--", label="3 x input + probabilities"
    )
    axes[0].set(xlabel="volume (million voxels)", ylabel="seconds per volume", title="time", xscale="log", yscale="log")
    axes[1].set(
        xlabel="volume (million voxels)",
        ylabel="peak CPU memory growth (MB)",
        title="memory",
        xscale="log",
        yscale="log",
    )
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"sliding-window inference cost vs volume ({result['device']}, {result['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_markdown(result: dict, path: str) -> None:
    nets = list(result["networks"])
    lines = [
        "# Inference cost against volume size",
        "",
        f"`python benchmarks/scaling.py {' '.join(result['argv'])}`: {result['device']}, {result['threads']} threads, "
        f"AMP {result['amp']}. Random weights, synthetic volume on the network's grid, one pass per (network, size) "
        "in a fresh process; windows on the compute device, stitching on the CPU. Peak memory is the growth of the "
        "process's resident set during the pass; the bound is 3 x the input plus the output probabilities (float32).",
        "",
        "| volume | voxels (M) | "
        + " | ".join(f"{n} s" for n in nets)
        + " | "
        + " | ".join(f"{n} MB" for n in nets)
        + " | bound MB |",
        "|---|---|" + "---|" * (2 * len(nets)) + "---|",
    ]
    for i, size in enumerate(result["sizes"]):
        rows = [result["networks"][n][i] for n in nets]
        lines.append(
            f"| {'x'.join(map(str, size))} | {rows[0]['voxels'] / 1e6:.2f} | "
            + " | ".join(f"{r['seconds']:.1f}" for r in rows)
            + " | "
            + " | ".join(f"{r['cpu_peak_mb']:.0f}" for r in rows)
            + f" | {rows[0]['bound_mb']:.0f} |"
        )
    lines += ["", "Ratios to MONAI's UNet (time, memory) at each size:", ""]
    for n in nets:
        if n == UNET:
            continue
        pairs = [
            f"{r['seconds'] / u['seconds']:.2f}x / {r['cpu_peak_mb'] / max(u['cpu_peak_mb'], 1e-9):.2f}x"
            for r, u in zip(result["networks"][n], result["networks"][UNET])
        ]
        lines.append(f"- {n}: " + ", ".join(pairs))
    lines += [
        "",
        "Growth from the smallest to the largest volume (voxels grow "
        f"{result['sizes_voxels'][-1] / result['sizes_voxels'][0]:.1f}x):",
        "",
    ]
    for n in nets:
        rows = result["networks"][n]
        grown = [i for i, r in enumerate(rows) if r["cpu_peak_mb"] >= 1.0]  # below 1 MB: the allocator's noise
        memory = (
            "memory n/a (no growth at any size)"
            if not grown
            else f"memory {rows[-1]['cpu_peak_mb'] / rows[grown[0]]['cpu_peak_mb']:.1f}x from "
            + "x".join(map(str, result["sizes"][grown[0]]))
        )
        lines.append(
            f"- {n}: time {rows[-1]['seconds'] / rows[0]['seconds']:.1f}x, {memory}; "
            f"largest volume at {rows[-1]['cpu_peak_mb'] / rows[-1]['bound_mb']:.2f} of its bound "
            f"({rows[-1]['bound_mb']:.0f} MB)"
        )
    lines += [
        "",
        "Each network's bound is its own: 3 x the input plus its output probabilities (UNet, IAPL, MPCL: 7 classes;",
        "IPLSL: 2, one 1-way episode). The bound column of the table is the 7-class one. A growth of 0 MB means the",
        "pass fitted in memory the warm-up pass had already taken from the system.",
        "",
        "![scaling](scaling.png)",
        "",
    ]
    Path(path).write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 160, 192], help="cube edges (voxels)")
    ap.add_argument("--shape", type=int, nargs=3, action="append", default=[], help="extra volume shapes")
    ap.add_argument("--networks", nargs="+", default=[UNET, *BUNDLES], help="networks to measure")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--amp", action="store_true", help="autocast the windows (GPU)")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "scaling"))
    args = ap.parse_args(argv)
    sizes = [(s, s, s) for s in args.sizes] + [tuple(s) for s in args.shape]
    result: dict = {
        "argv": sys.argv[1:] if argv is None else argv,
        "device": args.device,
        "threads": args.threads,
        "amp": args.amp,
        "sizes": [list(s) for s in sizes],
        "sizes_voxels": [int(s[0] * s[1] * s[2]) for s in sizes],
        "networks": {n: [] for n in args.networks},
    }
    for size in sizes:  # sizes outer, networks inner: a slowdown of a shared machine hits every network alike
        voxels = size[0] * size[1] * size[2]
        for name in args.networks:
            row = measure(name, size, args.device, args.threads, args.amp)
            classes = row["output_shape"][1]
            row.update(voxels=voxels, bound_mb=(3 * voxels + classes * voxels) * 4 / 2**20)
            result["networks"][name].append(row)
            print(
                f"{name:14s} {'x'.join(map(str, size)):>13s}: {row['seconds']:7.1f} s, "
                f"CPU +{row['cpu_peak_mb']:7.0f} MB (bound {row['bound_mb']:.0f} MB)"
                + (f", GPU {row['gpu_peak_mb']:.0f} MB" if "gpu_peak_mb" in row else ""),
                flush=True,
            )
            Path(args.out + ".json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    write_markdown(result, args.out + ".md")
    plot(result, args.out + ".png")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
