# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""One benchmark run under the protocol: every network x every seed trained by the bundle config at the same
budget, scored on the held-out splits (curves and final weights) beside the trivial references, then timed and
measured side by side, and written as JSON, Markdown and PNG."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence

import monai
import torch

from monai_proto.apps.allocator import freed_memory_kept
from monai_proto.apps.benchmark.metrics import reference_scores
from monai_proto.apps.benchmark.report import write_cost_report, write_report
from monai_proto.apps.benchmark.runner import (
    CONTENDED_CORES,
    NetworkSpec,
    interleaved_inference_seconds,
    interleaved_training_step_seconds,
    make_parser,
    other_processes_cores,
    peak_inference_memory_mb,
    summarise_seeds,
    train_with_curves,
)
from monai_proto.apps.benchmark.splits import describe_split, load_splits

__all__ = [
    "IO_HANDLERS",
    "add_arguments",
    "load_run",
    "run_benchmark",
    "run_fingerprint",
    "save_run",
    "strip_io_handlers",
]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

#: Training handlers that only write or report (no effect on the weights): the harness drops them.
IO_HANDLERS = (
    "ValidationHandler",
    "CheckpointSaver",
    "ResumableCheckpoint",
    "PublishModelHandler",
    "StatsHandler",
    "TensorBoardStatsHandler",
    "MLFlowHandler",
    "ignite.handlers.ProgressBar",
)


def add_arguments(ap: argparse.ArgumentParser, iterations: int, eval_points: int = 6) -> argparse.ArgumentParser:
    """The command-line arguments every benchmark script shares."""
    ap.add_argument("--iterations", type=int, default=iterations, help="training iterations per network and seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--eval_points", type=int, default=eval_points, help="held-out curve points per run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed inference passes")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks"), help="folder of the result files")
    ap.add_argument("--workdir", default=None, help="checkpoints and logs (default: a temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="a few iterations on a coarse grid: checks the harness only")
    ap.add_argument(
        "--save_models",
        action="store_true",
        help="also write each run's final weights to <workdir>/<network>_seed<seed>.pt (tensors only), for "
        "diagnostics after the run",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep each finished training run in <workdir>/runs/ and reuse it in a later process when the package "
        "code, the script, the config and the run's settings are unchanged: a run too long for one sitting can be "
        "stopped and started again with the same command (give --workdir on a disk that lasts)",
    )
    ap.add_argument(
        "--body_restriction",
        choices=("on", "off"),
        default="on",
        help="on: every prediction is set to background outside the split's body mask before it is scored, as every "
        "bundle's inference does; off: the raw output is scored (the raw mean Dice is reported either way)",
    )
    ap.add_argument(
        "--networks",
        nargs="+",
        default=None,
        help="train only these networks, the method among them (an ablation or a partial run; verdicts, gap "
        "shares and cost only among them); default: all",
    )
    ap.add_argument(
        "--cost_only",
        action="store_true",
        help="no training and no Dice: inference time, peak memory and training step of every network at its "
        "initial weights, beside the cost reference; writes <name>_cost.{json,md}",
    )
    ap.add_argument(
        "--modality",
        choices=("ct", "mri"),
        default="ct",
        help="ct: splits A-slab and B of the CT demo data; mri: the held-out slab of the embedded MRI (MRI-slab), "
        "Otsu body mask, results written as <name>_mri.*",
    )
    return ap


def strip_io_handlers(parser, handlers_id: str = "train#handlers") -> None:
    """Drop the handlers that only write or report, so a benchmark run leaves no checkpoints or logs behind."""
    handlers = parser[handlers_id]
    parser[handlers_id] = [h for h in handlers if not (isinstance(h, dict) and h.get("_target_") in IO_HANDLERS)]


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _hardware(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def run_benchmark(
    *,
    name: str,
    title: str,
    bundle: str,
    config_file: str | Sequence[str],
    method: NetworkSpec,
    baselines: Sequence[NetworkSpec],
    args: argparse.Namespace,
    common_overrides: Mapping[str, object] | None = None,
    smoke_overrides: Mapping[str, object] | None = None,
    differences: str = "",
    split_notes: Mapping[str, str] | None = None,
    reading: str = "",
    predictor_factory: Callable | None = None,
    sections: Mapping[str, str] | None = None,
    split_options: Mapping[str, Mapping] | None = None,
    organs: Sequence[str] | None = None,
    split_transforms: Sequence[Callable] = (),
    timing_split: str | None = None,
    cost_overrides: Mapping[str, object] | None = None,
    cost_reference: NetworkSpec | None = None,
    comparisons: Sequence[tuple[str, str]] = (),
    bounds: tuple[str, str] | None = None,
    initial_state: Callable[[torch.nn.Module], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run a benchmark and write ``<args.out>/<name>.{json,md,png}``.

    Args:
        name: file stem (the bundle name without its suffix, e.g. ``"iapl"``).
        title: heading of the Markdown file.
        bundle: bundle folder name (for the JSON).
        config_file: the bundle's training config.
        method: the method's network.
        baselines: the baselines, trained in the same run.
        args: the parsed :func:`add_arguments`.
        common_overrides: config overrides for every network (on top of budget, seed and device).
        smoke_overrides: further overrides in ``--smoke`` mode (coarse grid, small windows).
        differences: what differs between the networks, for the header.
        split_notes: split -> sentence under its table.
        reading: "Reading these figures" text.
        predictor_factory: ``(parser, spec) -> predictor`` when the bundle's inferer is not enough (few-shot);
            a predictor maps ``(network, split)`` to a class map ``(1, 1, *S)``.
        sections: split name -> data-list section (default A-slab = validation, B = test; with
            ``args.modality == "mri"``: MRI-slab = validation, the MRI's held-out slab, and a benchmark's own
            sections must be named ``MRI...``, so that splits built for the CT data are never scored on the MRI).
        split_options: split name -> options its predictor reads (e.g. the number of shots).
        organs: the scored classes, in label order ``1..K``; default: the config's ``organs``.
        split_transforms: transforms applied after the config's ``train#deterministic_transforms`` when the
            splits are loaded (e.g. ``SelectLabelsd`` to the scored classes of a few-shot bundle).
        timing_split: the split whose volume is timed (default: the first).
        cost_overrides: config overrides of the timing and memory runs only (e.g. a fixed support set for a
            support-conditioned inferer).
        cost_reference: a network measured for cost only (inference time, peak memory, training step), at its
            initial weights, neither trained nor scored; the cost ratios then compare the method with it instead of
            the first baseline (e.g. MONAI's UNet beside baselines that all share the method's architecture).
        comparisons: further ``(network, other)`` pairs to give a verdict on, besides the method against each
            baseline (e.g. mean teacher against supervised-only).
        bounds: ``(lower, upper)``: two of the networks between which every other network's share of the gap in
            mean Dice is reported (e.g. supervised-only and the fully supervised bound).
        initial_state: with ``--cost_only``, applied to every timed network at its initial weights to give it the
            state training would have given it before the steady state (e.g. mark a prototype bank as initialised,
            so that the loss terms that wait for it are timed).
        log: progress output.

    Returns:
        the result dictionary (as written to JSON).
    """
    torch.set_num_threads(args.threads)
    commit = _commit()  # the code this process runs: commits landing during a long run must not be recorded
    modality = getattr(args, "modality", "ct")
    if modality == "mri":  # the embedded MRI: one scan, scored on its held-out slab
        if sections is not None and not all(split.startswith("MRI") for split in sections):
            raise ValueError(
                f"{name}: --modality mri scores the MRI's held-out slab; this benchmark names its own splits "
                f"({list(sections)}), built for the CT data: name MRI splits 'MRI...' once they are built for it."
            )
        name, title = f"{name}_mri", f"{title}, MRI"
        common_overrides = {"modality": "mri", **dict(common_overrides or {})}
        sections = dict(sections or {"MRI-slab": "validation"})
    iterations = 2 if args.smoke else args.iterations
    seeds = list(args.seeds[:1] if args.smoke else args.seeds)
    eval_every = max(1, iterations // max(1, args.eval_points))
    workdir = args.workdir or tempfile.mkdtemp(prefix=f"bench_{name}_")
    overrides: dict = {
        "device": f"$torch.device('{args.device}')",
        "amp": args.device.startswith("cuda"),
        "epochs": 1,
        "iterations_per_epoch": iterations,
        **dict(common_overrides or {}),
        **(dict(smoke_overrides or {}) if args.smoke else {}),
    }
    base = make_parser(config_file, overrides)
    organs = list(base.get_parsed_content("organs") if organs is None else organs)
    deterministic = base.get_parsed_content("train#deterministic_transforms")
    deterministic = [deterministic] if callable(deterministic) else list(deterministic)
    preprocessing = _compose([*deterministic, *split_transforms])
    splits = load_splits(
        preprocessing,
        base.get_parsed_content("dataset_dir"),
        base.get_parsed_content("pixdim"),
        sections,
        split_options,
        modality,
    )
    log(f"== {title}: {iterations} iterations, seeds {seeds}, splits " + ", ".join(s.name for s in splits))
    specs = [method, *baselines]
    names = [s.name for s in specs]
    unknown = sorted({n for pair in [*comparisons, *([bounds] if bounds else [])] for n in pair} - set(names))
    if unknown:
        raise ValueError(f"{name}: comparisons and bounds must name trained networks ({names}), but got {unknown}.")
    chosen = getattr(args, "networks", None)
    if chosen:  # a partial run: only the chosen networks, and only the verdicts among them
        if method.name not in chosen or set(chosen) - set(names):
            raise ValueError(f"{name}: --networks must name the method {method.name!r} and networks of {names}.")
        if cost_reference is None and not set(chosen) & {b.name for b in baselines}:
            # the method alone: its first baseline is still timed beside it, for cost only (initial weights)
            cost_reference = baselines[0] if baselines else None
        baselines = [b for b in baselines if b.name in chosen]
        specs = [method, *baselines]
        comparisons = [pair for pair in comparisons if set(pair) <= set(chosen)]
        bounds = bounds if bounds and set(bounds) <= set(chosen) else None
        log(f"== partial run: {', '.join(s.name for s in specs)} only")
    restrict = args.body_restriction == "on"
    runs: dict[str, list[dict]] = {s.name: [] for s in specs}
    resume = bool(getattr(args, "resume", False)) and not args.cost_only
    if resume and not args.workdir:
        raise ValueError(f"{name}: --resume keeps the runs in --workdir: give one on a disk that lasts.")
    resumed: dict[str, dict] = {}  # runs reused from an earlier process: where and when they were trained
    for seed in [] if args.cost_only else seeds:
        for spec in specs:
            root = os.path.join(workdir, f"{spec.name}_seed{seed}")
            parser = make_parser(config_file, {**overrides, **spec.overrides, "seed": seed, "bundle_root": root})
            strip_io_handlers(parser)
            predictor = predictor_factory(parser, spec) if predictor_factory else None
            stored = os.path.join(workdir, "runs", f"{spec.name}_seed{seed}.pt")
            if resume:
                key = run_fingerprint(
                    config_file,
                    {**overrides, **spec.overrides, "seed": seed},
                    {
                        "network": spec.name,
                        "trainer": spec.trainer_id,
                        "iterations": iterations,
                        "eval_every": eval_every,
                        "splits": [s.name for s in splits],
                        "organs": organs,
                        "restrict": restrict,
                        "device": args.device,
                        "threads": args.threads,
                        "versions": [torch.__version__, monai.__version__],
                    },
                )
                record = load_run(stored, key, log)
                if record is not None:
                    log(f"== reusing {spec.name}, seed {seed}: trained at {record['commit']} on {record['date']}")
                    resumed[f"{spec.name}_seed{seed}"] = {"commit": record["commit"], "date": record["date"]}
                    runs[spec.name].append(record["run"])
                    continue
            log(f"== training {spec.name}, seed {seed}")
            run = train_with_curves(parser, spec, splits, organs, iterations, eval_every, predictor, log, restrict)
            log(f"   {run['seconds_per_iteration']:.2f} s/iteration")
            if resume:
                save_run(stored, {"fingerprint": key, "commit": commit, "date": time.strftime("%Y-%m-%d"), "run": run})
            if getattr(args, "save_models", False):
                os.makedirs(workdir, exist_ok=True)
                torch.save(run["state_dict"], os.path.join(workdir, f"{spec.name}_seed{seed}.pt"))
            runs[spec.name].append(run)
    results: dict = {}
    for split in [] if args.cost_only else splits:
        refs = reference_scores(split, organs)
        results[split.name] = {s.name: summarise_seeds(runs[s.name], split.name, organs) for s in specs}
        results[split.name]["body_mask"] = refs["body_mask"]
        results[split.name]["empty"] = refs["empty"]
    # cost: the first seed's trained weights (a cost reference, and every network with --cost_only, keeps its initial
    # ones), interleaved timing over the first split's whole volume
    timing_split = splits[0] if timing_split is None else next(s for s in splits if s.name == timing_split)
    cost = {**overrides, **dict(cost_overrides or {})}
    timed = [*specs, *([] if cost_reference is None else [cost_reference])]
    networks = {}
    for spec in timed:
        parser = make_parser(config_file, {**cost, **spec.overrides})
        net = parser.get_parsed_content("network_def").to(torch.device(args.device))
        if runs.get(spec.name):
            net.load_state_dict(runs[spec.name][0]["state_dict"])
        elif args.cost_only and initial_state is not None:
            initial_state(net)
        networks[spec.name] = net.eval()
    inferer = make_parser(config_file, cost).get_parsed_content("validate#inferer")
    load_before = other_processes_cores()
    if load_before is not None and load_before >= CONTENDED_CORES:
        log(f"WARNING: other processes keep {load_before:.1f} cores busy: the cost figures will be contended")
    log("== timing inference (interleaved)")
    allocator = {"inference": _allocator_state()}
    seconds = interleaved_inference_seconds(
        networks, inferer, timing_split.image, repeats=1 if args.smoke else args.repeats
    )
    trainers = {}
    for spec in timed:
        parser = make_parser(config_file, {**cost, **spec.overrides, "seed": seeds[0]})
        strip_io_handlers(parser)
        if "initialize" in parser:
            parser.get_parsed_content("initialize")
        trainer = parser.get_parsed_content(spec.trainer_id)
        if runs.get(spec.name):
            trainer.network.load_state_dict(runs[spec.name][0]["state_dict"])
        elif args.cost_only and initial_state is not None:
            initial_state(trainer.network)
        trainers[spec.name] = trainer
    log("== timing training iterations (interleaved, data loading excluded)")
    step_repeats = 2 if args.smoke else 4 * args.repeats
    allocator["training_step"] = _allocator_state()
    step_seconds = interleaved_training_step_seconds(trainers, repeats=step_repeats)
    del trainers
    load_after = other_processes_cores()
    memory = {}
    for spec in timed:
        log(f"== peak memory of {spec.name} (fresh process)")
        memory[spec.name] = peak_inference_memory_mb(
            config_file,
            {**cost, **spec.overrides},
            timing_split.image,
            os.path.join(workdir, "memory"),
            args.threads,
        )
    first, second = method.name, (baselines[0] if cost_reference is None else cost_reference).name
    per_it = {
        s.name: sum(r["seconds_per_iteration"] for r in runs[s.name]) / len(runs[s.name]) for s in specs if runs[s.name]
    }
    speed = {
        "volume": f"{_in_repo(timing_split.item.get('image', timing_split.name))} ({timing_split.name} volume), "
        + "x".join(str(v) for v in timing_split.image.shape[2:]),
        "voxels": int(timing_split.image[0, 0].numel()),
        "repeats": 1 if args.smoke else args.repeats,
        "reference": second,
        "inference_seconds": seconds,
        "peak_memory_mb": {k: v["peak_memory_mb"] for k, v in memory.items()},
        "memory_kind": next(iter(memory.values()))["kind"],
        "seconds_per_iteration": per_it,
        "training_step_seconds": step_seconds,
        "training_step_repeats": step_repeats,
        "parameters": {name: sum(p.numel() for p in net.parameters()) for name, net in networks.items()},
        # cores kept busy by other processes just before and just after the timed inference and training steps
        "other_processes_cores": {"before": load_before, "after": load_after},
        # the C allocator's state while each was timed (monai_proto.apps.keep_freed_memory, which a config's
        # initialize may apply; peak memory is measured in a fresh process that does not)
        "allocator": allocator,
        "throughput_ratio": seconds[second] / seconds[first],
        "memory_ratio": memory[first]["peak_memory_mb"] / max(memory[second]["peak_memory_mb"], 1e-9),
        "train_time_ratio": step_seconds[first] / step_seconds[second],
        # wall time of training runs: none for a cost reference, which is not trained
        "wall_train_time_ratio": per_it[first] / per_it[second] if second in per_it else float("nan"),
    }
    result = {
        "bundle": bundle,
        "name": name,
        "title": title + (" (SMOKE RUN: not a result)" if args.smoke else ""),
        "modality": modality,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "", *sys.argv[1:]]),
        "commit": commit,
        "hardware": _hardware(args.device),
        "device": args.device,
        "threads": args.threads,
        "versions": {"torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
        "iterations": iterations,
        "seeds": seeds,
        "body_restriction": restrict,
        "method": method.name,
        "baselines": [b.name for b in baselines],
        "cost_reference": None if cost_reference is None else cost_reference.name,
        "comparisons": [list(pair) for pair in comparisons],
        "bounds": None if bounds is None else list(bounds),
        "organs": organs,
        "differences": differences,
        "split_notes": dict(split_notes or {}),
        "splits": {s.name: describe_split(s, organs) for s in splits},
        "results": results,
        "curves": {s.name: {str(seed): run["curve"] for seed, run in zip(seeds, runs[s.name])} for s in specs},
        "losses": {s.name: {str(seed): run["losses"] for seed, run in zip(seeds, runs[s.name])} for s in specs},
        "speed": speed,
    }
    if resumed:
        result["resumed_runs"] = resumed
    if args.cost_only:
        result["name"] = f"{name}_cost"
        result["title"] = f"{title}: cost only (initial weights, no training)" + (" (SMOKE RUN)" if args.smoke else "")
        paths = write_cost_report(result, args.out)
    else:
        predictions = {s.name: runs[s.name][0]["prediction"] for s in specs}
        paths = write_report(result, predictions, splits, args.out, reading)
    log("== wrote " + ", ".join(paths.values()))
    return result


def run_fingerprint(config_file: str | Sequence[str], overrides: Mapping, settings: Mapping) -> str:
    """What a stored training run depends on, as one SHA-256: every Python file of the package, the running script,
    the config files, the run's config overrides and its other settings (network, budget, splits, device, threads,
    versions). A change to any of them makes a stored run stale."""
    digest = hashlib.sha256()
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sources = sorted(
        os.path.join(folder, f) for folder, _, files in os.walk(package) for f in files if f.endswith(".py")
    )
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    configs = [config_file] if isinstance(config_file, str) else list(config_file)
    for path in [*sources, *([script] if os.path.isfile(script) else []), *configs]:
        digest.update(os.path.relpath(path, package).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    digest.update(json.dumps({"overrides": overrides, **settings}, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def save_run(path: str, record: dict) -> None:
    """Write a finished run (``{"fingerprint", "commit", "date", "run"}``, tensors and plain values only) so that no
    reader ever sees half a file: a temporary file beside it, then an atomic rename."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.partial"
    torch.save(record, partial)
    os.replace(partial, path)


def load_run(path: str, fingerprint: str, log: Callable[[str], None] = print) -> dict | None:
    """The run stored at ``path`` when its fingerprint is ``fingerprint``; None (and a log line saying why) when there
    is none, it is unreadable, or it was trained by other code or settings."""
    if not os.path.isfile(path):
        return None
    try:
        record = torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file: train again rather than fail a long run
        log(f"   {path} is unreadable ({type(e).__name__}: {e}): training again")
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        log(f"   {path} was trained by other code or settings: training again")
        return None
    return record


def _in_repo(path: str) -> str:
    """A path inside the repository relative to it (the reports name no machine's folders), any other unchanged."""
    absolute = os.path.abspath(path)
    return os.path.relpath(absolute, REPO) if absolute.startswith(REPO + os.sep) else path


def _compose(transforms):
    from monai.transforms import Compose

    return transforms if callable(transforms) else Compose(transforms)


def _allocator_state() -> str:
    """The C allocator's state now, as the results record it: ``"keep_freed_memory"`` or ``"default"``."""
    return "keep_freed_memory" if freed_memory_kept() else "default"
