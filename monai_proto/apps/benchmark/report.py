# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The benchmark's three files: ``<name>.json`` (protocol layout), ``<name>.md`` (tables, verdicts, reading
notes) and ``<name>.png`` (held-out Dice curves of every network and seed, plus one overlay per network on the
same slice in radiological orientation)."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np

from monai_proto.apps.benchmark.metrics import mean_of
from monai_proto.apps.benchmark.runner import CONTENDED_CORES, dump_json, verdict

__all__ = ["gap_closed", "radiological", "write_report"]


def radiological(axial: np.ndarray) -> np.ndarray:
    """An axial slice ``[x, y]`` of an RAS-oriented volume as displayed in radiology: patient's right on the
    viewer's left, anterior at the top (rows = ``y`` from anterior, columns = ``x`` from the patient's right)."""
    return np.asarray(axial).T[::-1, ::-1]


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _seeds(values: Sequence[float], digits: int = 3) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "n/a"
    if len(values) == 1:
        return _fmt(values[0], digits)
    return f"{_fmt(mean_of(values), digits)} ({'/'.join(_fmt(v, digits) for v in values)})"


def _header(result: Mapping) -> list[str]:
    return [
        f"# {result['title']}",
        "",
        f"Command: `{result['command']}`  ",
        f"Commit: `{result['commit']}`; hardware: {result['hardware']}; threads: {result['threads']}; "
        f"torch {result['versions']['torch']}, MONAI {result['versions']['monai']}; date {result['date']}.  ",
        *_resumed_lines(result),
    ]


def _resumed_lines(result: Mapping) -> list[str]:
    """The header line that names the training runs an earlier process of the same command trained (``--resume``):
    same code, config and settings, so the same weights on a deterministic device; their seconds per iteration are
    that process's."""
    resumed = result.get("resumed_runs") or {}
    if not resumed:
        return []
    runs = "; ".join(f"{run.replace('_seed', ' seed ')} ({v['commit']}, {v['date']})" for run, v in resumed.items())
    return [
        f"Trained by an earlier process of this command (`--resume`, same code, config and settings): {runs}.  ",
    ]


def _markdown(result: Mapping, reading: str) -> str:
    organs = result["organs"]
    nets = [result["method"], *result["baselines"]]
    lines = [
        *_header(result),
        f"Budget: {result['iterations']} iterations per network and seed; seeds {result['seeds']}; final weights "
        "evaluated (no model selection). Every network is trained by the same bundle config; what differs: "
        f"{result['differences']}.",
        "",
        *(
            [
                "Body restriction on: every network's prediction is set to background outside the split's body mask "
                "before scoring, as every bundle's inference does (`BodyMaskd` + `RestrictToBodyd`); the volume ratios "
                "are after it, the outside-body shares and the raw mean Dice (below each table) before it.",
                "",
            ]
            if result.get("body_restriction")
            else []
        ),
    ]
    for split, entries in result["results"].items():
        lines += [
            f"## {split}: Dice per organ (mean over seeds, per-seed values in brackets)",
            "",
            f"{result['split_notes'].get(split, '')}",
            "",
            "| organ | " + " | ".join(nets) + " | body mask | empty |",
            "|---|" + "---|" * (len(nets) + 2),
        ]
        for organ in organs:
            row = [_seeds(entries[n]["dice"][organ]) for n in nets]
            row += [_fmt(entries["body_mask"]["dice"][organ]), _fmt(entries["empty"]["dice"][organ])]
            lines.append(f"| {organ} | " + " | ".join(row) + " |")
        row = [f"**{_seeds(entries[n]['mean_dice'])}**" for n in nets]
        row += [_fmt(entries["body_mask"]["mean_dice"]), _fmt(entries["empty"]["mean_dice"])]
        lines.append("| **mean** | " + " | ".join(row) + " |")
        if all("unrestricted_mean_dice" in entries[n] for n in nets):
            row = [_seeds(entries[n]["unrestricted_mean_dice"]) for n in nets]
            lines.append("| mean without body restriction | " + " | ".join(row) + " | | |")
        lines += [
            "",
            "Predicted / true volume (mean over seeds; 1 is right, the body mask's ratio shows what painting "
            "the body gives):",
            "",
            "| organ | " + " | ".join(nets) + " | body mask |",
            "|---|" + "---|" * (len(nets) + 1),
        ]
        for organ in organs:
            row = [_fmt(mean_of(entries[n]["volume_ratio"][organ]), 2) for n in nets]
            lines.append(
                f"| {organ} | " + " | ".join(row) + f" | {_fmt(entries['body_mask']['volume_ratio'][organ], 1)} |"
            )
        lines += [
            "",
            "Share of each organ's predicted voxels outside the body mask, before any body restriction (mean over "
            "seeds where any is predicted; a high share is the air around the patient painted as the organ):",
            "",
            "| organ | " + " | ".join(nets) + " |",
            "|---|" + "---|" * len(nets),
        ]
        for organ in organs:
            row = [_fmt(mean_of(entries[n]["outside_body"][organ]), 2) for n in nets]
            lines.append(f"| {organ} | " + " | ".join(row) + " |")
        lines += [
            "",
            "HD95 in mm (mean over seeds where defined):",
            "",
            "| organ | " + " | ".join(nets) + " |",
            "|---|" + "---|" * len(nets),
        ]
        for organ in organs:
            lines.append(f"| {organ} | " + " | ".join(_fmt(mean_of(entries[n]["hd95"][organ]), 1) for n in nets) + " |")
        lines += [
            "",
            "Verdicts (protocol: ahead only when the difference of mean Dice exceeds the larger seed spread):",
            "",
        ]
        for b in result["baselines"]:
            v = result["verdicts"][split][b]
            lines.append(
                f"- {result['method']} vs {b}: difference {v['difference']:+.3f}, larger spread {_fmt(v['spread'])}: "
                f"**{v['verdict']}**."
            )
        for pair, v in result.get("comparison_verdicts", {}).get(split, {}).items():
            lines.append(
                f"- {pair}: difference {v['difference']:+.3f}, larger spread {_fmt(v['spread'])}: **{v['verdict']}**."
            )
        if result.get("bounds"):
            lower, upper = result["bounds"]
            shares = result["gap_closed"][split]
            lines.append(
                f"- Share of the gap in mean Dice between {lower} and {upper} "
                f"({_fmt(mean_of(entries[lower]['mean_dice']))} to {_fmt(mean_of(entries[upper]['mean_dice']))}) "
                "closed, from the means over seeds: " + ", ".join(f"{n} {_fmt(v, 2)}" for n, v in shares.items()) + "."
            )
        body = entries["body_mask"]["mean_dice"]
        for n in nets:
            m = mean_of(entries[n]["mean_dice"])
            if math.isfinite(m) and math.isfinite(body) and m <= body:
                lines.append(
                    f"- {n} is at or below the body mask ({_fmt(m)} <= {_fmt(body)}): it has learned nothing here."
                )
        lines.append("")
    lines += _pseudo_label_lines(result)
    lines += _cost_lines(result, "## Cost (same run)")
    lines += [
        f"![curves and overlays]({result['name']}.png)",
        "",
        "## Reading these figures",
        "",
        reading.strip(),
        "",
    ]
    return "\n".join(lines)


def pseudo_label_windows(curve: Mapping, classes: Sequence[str]) -> list[dict]:
    """Pseudo-labels per class between consecutive curve points, from the running counts that
    :class:`~monai_proto.handlers.PrototypeBankHandler` leaves in the trainer's metrics (``pseudo_<c>_count``,
    ``pseudo_unlabelled_voxels``; they start again with each epoch).

    Returns:
        one entry per curve point that has the counts: ``{"start", "end", "voxels", "count": {c: n}, "fraction":
        {c: n / voxels}}``, ``start`` exclusive; empty when the run logged no pseudo-labels.
    """
    windows: list[dict] = []
    previous, start = None, 0
    for iteration, metrics in zip(curve.get("iterations", []), curve.get("train_metrics", [])):
        if "pseudo_unlabelled_voxels" not in metrics:
            continue
        now = {"voxels": metrics["pseudo_unlabelled_voxels"]} | {
            c: metrics.get(f"pseudo_{c}_count", 0.0) for c in classes
        }
        # the counters restart with each epoch: a fall means a new epoch began inside the window
        base = previous if previous is not None and now["voxels"] >= previous["voxels"] else None
        delta = {k: v - (base[k] if base else 0.0) for k, v in now.items()}
        voxels = max(delta["voxels"], 1.0)
        windows.append(
            {
                "start": start,
                "end": iteration,
                "voxels": delta["voxels"],
                "count": {c: delta[c] for c in classes},
                "fraction": {c: delta[c] / voxels for c in classes},
            }
        )
        previous, start = now, iteration
    return windows


def _pseudo_label_lines(result: Mapping) -> list[str]:
    """The pseudo-labels that passed the confidence threshold, per network, seed and curve window."""
    classes = ["background", *result["organs"]]
    rows = []
    for net, seeds in result.get("curves", {}).items():
        for seed, curve in seeds.items():
            for w in pseudo_label_windows(curve, classes):
                fg = sum(w["count"][c] for c in classes[1:])
                cells = [f"{w['count'][c]:.0f} ({100 * w['fraction'][c]:.2g} %)" for c in classes[1:]]
                rows.append(
                    f"| {net} | {seed} | {w['start'] + 1}-{w['end']} | {w['voxels']:.3g} | "
                    f"{100 * w['fraction']['background']:.3g} % | {fg:.0f} ({100 * fg / max(w['voxels'], 1):.2g} %) | "
                    + " | ".join(cells)
                    + " |"
                )
    if not rows:
        return []
    return [
        "## Pseudo-labels (teacher voxels at or above the confidence threshold, per window of iterations)",
        "",
        "Counted on the unlabelled crops the trainer drew (`PrototypeBankHandler`, the threshold in force at each "
        "iteration); these voxels feed the bank's pseudo-label update and the teacher-to-student direction of DKA. "
        "Fractions are of the window's unlabelled voxels.",
        "",
        "| network | seed | iterations | unlabelled voxels | background | foreground | "
        + " | ".join(result["organs"])
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(result["organs"]),
        *rows,
        "",
    ]


def _cost_lines(result: Mapping, heading: str) -> list[str]:
    """The cost table of a run: the method, its baselines and the cost reference, with the method's ratios."""
    nets = [result["method"], *result["baselines"]]
    speed = result["speed"]
    reference = speed.get("reference") or result["baselines"][0]
    timed = [*nets, *([] if reference in nets else [reference])]
    trained = bool(speed["seconds_per_iteration"])
    cost_only = (
        f" {reference} is measured for cost only, at its initial weights (neither trained nor scored)."
        if reference not in nets and trained
        else ""
    )
    wall = (
        "; training s/iteration: wall time of the runs above, data loading included, curve evaluation excluded, "
        "runs not interleaved"
        if trained
        else ""
    )
    load = [v for v in (speed.get("other_processes_cores") or {}).values() if v is not None]
    if not load:
        contention = " Other processes' load was not sampled."
    elif max(load) >= CONTENDED_CORES:
        contention = (
            f" **Contended: other processes kept up to {max(load):.1f} cores busy around the timing**, which moves "
            "the ratios toward 1: these cost figures are not of record."
        )
    else:
        contention = (
            f" Other processes kept at most {max(load):.2f} cores busy around the timing (sampled before and after)."
        )
    rows = [
        "| inference s/volume | " + " | ".join(_fmt(speed["inference_seconds"][n], 2) for n in timed) + " |",
        "| peak memory MB | " + " | ".join(_fmt(speed["peak_memory_mb"][n], 0) for n in timed) + " |",
        "| training step s | " + " | ".join(_fmt(speed["training_step_seconds"][n], 3) for n in timed) + " |",
        *(
            [
                "| training s/iteration | "
                + " | ".join(_fmt(speed["seconds_per_iteration"].get(n), 2) for n in timed)
                + " |"
            ]
            if trained
            else []
        ),
        "| parameters (M) | " + " | ".join(_fmt(speed["parameters"][n] / 1e6, 2) for n in timed) + " |",
    ]
    return [
        heading,
        "",
        f"Inference: sliding windows over {speed['volume']} ({speed['voxels']} voxels), median of {speed['repeats']} "
        "interleaved repeats; peak memory of one pass in a fresh process "
        f"({speed['memory_kind']}); training step: median seconds of one training iteration on a fixed batch, "
        f"{speed['training_step_repeats']} repeats interleaved, data loading "
        f"excluded (the training-time ratio){wall}.{cost_only}{contention}{_allocator_line(speed)}",
        "",
        "| | " + " | ".join(timed) + " |",
        "|---|" + "---|" * len(timed),
        *rows,
        "",
        f"{result['method']} vs {reference}: throughput {_fmt(speed['throughput_ratio'], 2)}x, "
        f"peak memory {_fmt(speed['memory_ratio'], 2)}x, training time {_fmt(speed['train_time_ratio'], 2)}x "
        "per step"
        + (
            f" ({_fmt(speed['wall_train_time_ratio'], 2)}x in wall time of the runs)."
            if math.isfinite(speed["wall_train_time_ratio"] or float("nan"))
            else "."
        ),
        "",
    ]


def _plot(result: Mapping, predictions: Mapping, splits: Sequence, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = [result["method"], *result["baselines"]]
    split_names = [s.name for s in splits]
    ncols = max(len(split_names), len(nets) + 1)
    fig, axes = plt.subplots(
        1 + len(split_names), ncols, figsize=(4 * ncols, 4 * (1 + len(split_names))), squeeze=False
    )
    colours = {n: f"C{i}" for i, n in enumerate(nets)}
    for col, split in enumerate(split_names):
        ax = axes[0, col]
        for net in nets:
            for seed, curve in result["curves"][net].items():
                ax.plot(
                    curve["iterations"],
                    curve[split],
                    color=colours[net],
                    marker="o",
                    ms=3,
                    linestyle="-" if str(seed) == str(result["seeds"][0]) else "--",
                    label=f"{net} seed {seed}",
                )
        ax.axhline(result["results"][split]["body_mask"]["mean_dice"], color="grey", linestyle=":", label="body mask")
        ax.set_title(f"held-out mean Dice, {split}")
        ax.set_xlabel("iteration")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    for col in range(len(split_names), ncols):
        axes[0, col].axis("off")
    organs = result["organs"]
    levels = np.arange(0.5, len(organs) + 1)
    for row, split in enumerate(splits, start=1):
        label = split.label[0, 0].numpy()
        counts = (np.isin(label, np.arange(1, len(organs) + 1)) & split.region.numpy()).sum(axis=(0, 1))
        z = int(np.argmax(counts))
        image = radiological(split.image[0, 0, :, :, z].numpy())
        panels = [("truth", label)] + [(n, predictions[n][split.name]) for n in nets]
        for col, (title, seg) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray")
            seg2d = radiological(np.asarray(seg)[:, :, z])
            masked = np.ma.masked_where(seg2d == 0, seg2d)
            ax.imshow(masked, cmap="tab10", vmin=0, vmax=10, alpha=0.45, interpolation="nearest")
            if col:
                ax.contour(radiological(label[:, :, z]), levels=levels, colors="lime", linewidths=0.6)
            ax.set_title(f"{split.name} slice {z}: {title}", fontsize=9)
            ax.axis("off")
        for col in range(len(panels), ncols):
            axes[row, col].axis("off")
    title = (
        f"{result['title']} (overlays: seed {result['seeds'][0]}, final weights; green = truth contour; "
        "radiological orientation: patient's right on the left)"
    )
    fig.suptitle(textwrap.fill(title, width=40 * ncols), fontsize=10)  # wrapped to the figure's width
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def gap_closed(entries: Mapping[str, Mapping], lower: str, upper: str) -> dict[str, float]:
    """Share of the gap in mean Dice (means over seeds) between ``lower`` and ``upper`` that each other network
    closes: 0 at ``lower``, 1 at ``upper``; NaN when ``upper`` is not above ``lower``.

    Args:
        entries: network -> its protocol entry on one split (``{"mean_dice": [per seed], ...}``).
        lower: the lower network (e.g. supervised-only).
        upper: the upper network (e.g. the fully supervised bound).
    """
    low, high = mean_of(entries[lower]["mean_dice"]), mean_of(entries[upper]["mean_dice"])
    gap = high - low
    return {
        name: (mean_of(entry["mean_dice"]) - low) / gap if math.isfinite(gap) and gap > 0 else float("nan")
        for name, entry in entries.items()
        if name not in (lower, upper)
    }


def write_cost_report(result: dict, out_dir: str) -> dict:
    """Write ``<name>.json`` and ``<name>.md`` of a ``--cost_only`` run (no training, no Dice) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{result['name']}.{ext}") for ext in ("json", "md")}
    dump_json(paths["json"], result)
    lines = [
        *_header(result),
        "No network was trained: every one is measured at its initial weights, which costs what trained weights "
        f"cost (the same layers run). What differs: {result['differences']}.",
        "",
        *_cost_lines(result, "## Cost"),
    ]
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines))
    return paths


def write_report(result: dict, predictions: Mapping, splits: Sequence, out_dir: str, reading: str = "") -> dict:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``out_dir``; return the paths.

    Args:
        result: the benchmark's result in the protocol layout plus ``title``, ``organs``, ``curves``,
            ``speed``, ``split_notes``, ``differences``, ``versions``, ``date``, and optionally ``comparisons``
            (``[network, other]`` pairs, verdicts written as ``comparison_verdicts``) and ``bounds``
            (``[lower, upper]``, each other network's share of the gap written as ``gap_closed``).
        predictions: network -> split -> ``(*S)`` class map of the first seed, for the overlays.
        splits: the :class:`~monai_proto.apps.benchmark.splits.EvaluationSplit` objects.
        out_dir: folder of the three files.
        reading: the "Reading these figures" text.
    """
    os.makedirs(out_dir, exist_ok=True)
    result["verdicts"] = {
        split: {
            b: verdict(entries[result["method"]]["mean_dice"], entries[b]["mean_dice"]) for b in result["baselines"]
        }
        for split, entries in result["results"].items()
    }
    result["comparison_verdicts"] = {
        split: {
            f"{a} vs {b}": verdict(entries[a]["mean_dice"], entries[b]["mean_dice"])
            for a, b in result.get("comparisons", [])
        }
        for split, entries in result["results"].items()
    }
    if result.get("bounds"):
        result["gap_closed"] = {
            split: gap_closed({n: entries[n] for n in [result["method"], *result["baselines"]]}, *result["bounds"])
            for split, entries in result["results"].items()
        }
    paths = {ext: os.path.join(out_dir, f"{result['name']}.{ext}") for ext in ("json", "md", "png")}
    dump_json(paths["json"], result)
    with open(paths["md"], "w") as f:
        f.write(_markdown(result, reading))
    _plot(result, predictions, splits, paths["png"])
    return paths


def _allocator_line(speed: dict) -> str:
    """The C allocator's state during the timings (absent from results written before it was recorded)."""
    state = speed.get("allocator")
    if not state:
        return ""
    return (
        f" C allocator (`monai_proto.apps.keep_freed_memory`): inference timed with {state.get('inference')}, "
        f"training steps with {state.get('training_step')}."
    )
