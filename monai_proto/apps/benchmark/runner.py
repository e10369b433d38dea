# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Training at a budget through a bundle's own config, held-out curves, and the cost measurements.

Every network of a benchmark is trained by the same bundle config (same data pipeline, windows, optimiser,
schedule, augmentation, seed); a :class:`NetworkSpec` only overrides the config ids that differ (usually
``network_def`` and ``loss``). Curves are scored on the held-out splits during training; the final weights are
what the tables report (no model selection on a test region).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.bundle import ConfigParser

from monai_proto.apps.benchmark.metrics import mean_of, score_prediction
from monai_proto.apps.benchmark.splits import EvaluationSplit
from monai_proto.transforms import restrict_to_body

__all__ = [
    "NetworkSpec",
    "SAME_WIDTH_UNET",
    "make_parser",
    "predict_classes",
    "train_with_curves",
    "interleaved_inference_seconds",
    "peak_inference_memory_mb",
    "run_in_fresh_process",
    "current_rss_mb",
    "other_processes_cores",
    "CONTENDED_CORES",
]

#: cores kept busy by other processes above which a cost measurement is flagged as contended (not of record)
CONTENDED_CORES: float = 0.3


@dataclass
class NetworkSpec:
    """A network of a benchmark: its name and the bundle-config ids it overrides.

    Attributes:
        name: name in tables and JSON (``"IAPLNet"``, ``"UNet"``, ...).
        overrides: config id -> value (ConfigParser syntax, e.g. ``{"network_def": {...}, "loss": {...}}``).
        trainer_id: config id of the trainer to run.
    """

    name: str
    overrides: dict = field(default_factory=dict)
    trainer_id: str = "train#trainer"


#: the supervised baseline as a bundle-config ``network_def``: MONAI's ``UNet`` of the bundle backbone's width
#: (``backbone_kwargs``: channels, strides, residual units), instance norm like the backbone
SAME_WIDTH_UNET: dict = {
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": "@in_channels",
    "out_channels": "@num_classes",
    "channels": "@backbone_kwargs#channels",
    "strides": "@backbone_kwargs#strides",
    "num_res_units": "@backbone_kwargs#num_res_units",
    "norm": "instance",
}


def make_parser(config_file: str | Sequence[str], overrides: Mapping[str, object]) -> ConfigParser:
    """A ConfigParser of the bundle config with ``overrides`` applied (ids use ``#`` for nesting)."""
    parser = ConfigParser()
    parser.read_config(config_file)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def predict_classes(
    network: torch.nn.Module, inferer: Callable, image: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Class map ``(1, 1, *S)`` of ``image`` by the inferer (eval mode, no gradients), on the CPU."""
    was_training = network.training
    network.eval()
    with torch.no_grad():
        logits = inferer(image.to(device), network)
    network.train(was_training)
    return torch.as_tensor(logits).as_subclass(torch.Tensor).argmax(1, keepdim=True).cpu()


def train_with_curves(
    parser: ConfigParser,
    spec: NetworkSpec,
    splits: Sequence[EvaluationSplit],
    organs: Sequence[str],
    iterations: int,
    eval_every: int,
    predictor: Callable[[torch.nn.Module, EvaluationSplit], torch.Tensor] | None = None,
    log: Callable[[str], None] = print,
    restrict: bool = False,
) -> dict:
    """Train one network for ``iterations`` iterations and score the held-out splits every ``eval_every``.

    The parser must already hold the run's overrides (seed, budget, device); ``initialize`` runs first, so the
    seed fixes the network's initialisation and the data order.

    Args:
        parser: bundle config parser.
        spec: the network.
        splits: held-out splits scored on the curve.
        organs: class names.
        iterations: training iterations (one epoch of that length).
        eval_every: iterations between curve points (the final iteration is always a point).
        predictor: ``(network, split) -> class map (1, 1, *S)``; default: the bundle's ``validate#inferer`` on
            ``split.image`` + argmax.
        log: progress output.
        restrict: score predictions restricted to each split's body mask (as the bundles' inference does; see
            :func:`~monai_proto.apps.benchmark.metrics.score_prediction`).

    Returns:
        ``{"network", "final": {split: scores}, "curve": {"iterations", split: [mean Dice], "train_metrics": [the
        trainer's numeric ``state.metrics`` at each point]}, "losses",
        "seconds_per_iteration", "state_dict", "prediction"}`` (``state_dict`` on the CPU, for timing runs;
        ``prediction``: split -> ``(*S)`` class map, for the overlays).
    """
    from ignite.engine import Events

    if "initialize" in parser:
        parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content(spec.trainer_id)
    network = trainer.network
    device = trainer.state.device if hasattr(trainer.state, "device") else next(network.parameters()).device
    if predictor is None:
        inferer = parser.get_parsed_content("validate#inferer")

        def predictor(net: torch.nn.Module, split: EvaluationSplit) -> torch.Tensor:
            return predict_classes(net, inferer, split.image, device)

    curve: dict[str, list] = {"iterations": []} | {s.name: [] for s in splits} | {"train_metrics": []}
    losses: list[float] = []
    timing = {"eval": 0.0}

    def record_loss(engine) -> None:
        out = engine.state.output
        out = out[0] if isinstance(out, list) else out
        losses.append(float(torch.as_tensor(out["loss"]).detach()))  # detached: no autograd warning

    def score(engine) -> None:
        start = time.perf_counter()
        it = engine.state.iteration
        curve["iterations"].append(it)
        # the trainer's own figures at this point (e.g. a handler's running pseudo-label counts), numbers only
        curve["train_metrics"].append(
            {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float)) and k != "loss"}
        )
        for split in splits:
            scores = score_prediction(predictor(network, split), split, organs, restrict)
            curve[split.name].append(scores["mean_dice"])
        timing["eval"] += time.perf_counter() - start
        log(f"   [{spec.name}] iteration {it}: " + ", ".join(f"{s.name} {curve[s.name][-1]:.3f}" for s in splits))

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record_loss)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=max(1, eval_every)), score)
    start = time.perf_counter()
    trainer.run()
    train_seconds = time.perf_counter() - start - timing["eval"]  # curve points scored during the run excluded
    if not curve["iterations"] or curve["iterations"][-1] != trainer.state.iteration:
        score(trainer)  # the final weights are always a curve point
    predictions = {split.name: predictor(network, split) for split in splits}  # one inference per split
    final = {split.name: score_prediction(predictions[split.name], split, organs, restrict) for split in splits}
    if restrict:  # the overlays show what is scored
        predictions = {s.name: restrict_to_body(predictions[s.name], s.body.cpu()) for s in splits}
    done = max(1, trainer.state.iteration)
    return {
        "network": spec.name,
        "final": final,
        "curve": curve,
        "losses": losses,
        "iterations": done,
        "seconds_per_iteration": train_seconds / done,
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "prediction": {name: prediction[0, 0].to(torch.uint8) for name, prediction in predictions.items()},
    }


def interleaved_inference_seconds(
    networks: Mapping[str, torch.nn.Module], inferer: Callable, image: torch.Tensor, repeats: int = 3
) -> dict[str, float]:
    """Median seconds of one sliding-window pass of each network over ``image``, repeats interleaved.

    Interleaving (A, B, A, B, ...) spreads any slowdown of a shared machine over all networks alike.
    """
    device = next(iter(networks.values())).parameters().__next__().device
    image = image.to(device)
    times: dict[str, list[float]] = {name: [] for name in networks}
    with torch.no_grad():
        for net in networks.values():  # warm-up
            net.eval()
            inferer(image, net)
        for _ in range(repeats):
            for name, net in networks.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                inferer(image, net)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def interleaved_training_step_seconds(
    trainers: Mapping[str, object], repeats: int = 10, warmup: int = 2
) -> dict[str, float]:
    """Median seconds of one training iteration of each trainer, on one fixed batch each, repeats interleaved.

    Each trainer runs its own ``_iteration`` (batch preparation, forward, loss, backward, optimiser step: what a
    training iteration costs beyond loading data) on the first batch of its own data loader. Data loading is
    left out: it is the same pipeline for every network and would only dilute the ratio. Interleaving spreads
    any slowdown of a shared machine over all networks alike, which the wall time of separate training runs
    does not.

    Args:
        trainers: name -> a MONAI trainer (``SupervisedTrainer`` or a subclass) that has not been run.
        repeats: timed iterations per trainer.
        warmup: untimed iterations per trainer first.
    """
    batches = {name: next(iter(trainer.data_loader)) for name, trainer in trainers.items()}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for i in range(warmup + repeats):
        for name, trainer in trainers.items():
            device = trainer.state.device
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer._iteration(trainer, batches[name])
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def other_processes_cores(seconds: float = 1.0) -> float | None:
    """Cores kept busy by other processes while this one sleeps ``seconds`` (Linux ``/proc/stat``).

    Timings taken while other work shares the cores are slowed unevenly: the ratios between networks move toward
    1 (measured here: an IPLSL throughput ratio of 0.61x alone read 0.65x and 0.92x beside other jobs). The
    harness samples this before and after its cost measurements and the report flags a contended run.

    Returns:
        busy cores of the whole machine minus this process's own CPU time, over the window (clipped at 0); ``None``
        where ``/proc/stat`` cannot be read.
    """

    def sample() -> tuple[list[int], int, float, float] | None:
        try:
            with open("/proc/stat") as f:
                lines = f.read().splitlines()
            fields = [int(v) for v in lines[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())  # the online cores
        return fields, max(cores, 1), time.process_time(), time.monotonic()

    first = sample()
    if first is None:
        return None
    time.sleep(seconds)
    second = sample()
    if second is None:
        return None
    delta = [b - a for a, b in zip(first[0], second[0])]
    total = sum(delta[:8])  # user nice system idle iowait irq softirq steal (guest time is counted in user)
    idle = delta[3] + (delta[4] if len(delta) > 4 else 0)
    elapsed = second[3] - first[3]
    if total <= 0 or elapsed <= 0:
        return None
    busy_cores = (total - idle) / total * second[1]
    own_cores = (second[2] - first[2]) / elapsed
    return max(busy_cores - own_cores, 0.0)


def current_rss_mb() -> float:
    """Resident set size of this process, MB (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _memory_worker(config_file, overrides, image_file, threads, queue) -> None:  # pragma: no cover - subprocess
    try:
        torch.set_num_threads(threads)
        parser = make_parser(config_file, overrides)
        device = parser.get_parsed_content("device")
        network = parser.get_parsed_content("network_def").to(device).eval()
        inferer = parser.get_parsed_content("validate#inferer")
        image = torch.from_numpy(np.load(image_file)).to(device)
        with torch.no_grad():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                inferer(image, network)
                torch.cuda.synchronize()
                queue.put(
                    {"peak_memory_mb": (torch.cuda.max_memory_allocated() - base) / 2**20, "kind": "GPU allocated"}
                )
                return
            before = current_rss_mb()
            peak = [before]
            stop = threading.Event()

            def poll() -> None:  # ru_maxrss is a process-lifetime figure; poll the current RSS instead
                while not stop.is_set():
                    peak[0] = max(peak[0], current_rss_mb())
                    time.sleep(0.002)

            thread = threading.Thread(target=poll, daemon=True)
            thread.start()
            inferer(image, network)
            stop.set()
            thread.join()
            queue.put({"peak_memory_mb": max(peak[0], current_rss_mb()) - before, "kind": "RSS growth"})
    except Exception as e:  # report the failure instead of hanging the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def peak_inference_memory_mb(
    config_file: str | Sequence[str],
    overrides: Mapping[str, object],
    image: torch.Tensor,
    workdir: str,
    threads: int = 2,
) -> dict:
    """Peak memory of one sliding-window pass, in a fresh process (RSS growth on CPU, allocated on GPU).

    Raises:
        RuntimeError: when the measuring process fails.
    """
    os.makedirs(workdir, exist_ok=True)
    image_file = os.path.join(workdir, "memory_image.npy")
    np.save(image_file, image.numpy())
    return run_in_fresh_process(
        _memory_worker, (config_file, dict(overrides), image_file, threads), "memory measurement"
    )


def run_in_fresh_process(target: Callable, args: tuple, what: str) -> dict:
    """Run ``target(*args, queue)`` in a spawned process and return the dict it puts on ``queue``.

    A fresh process keeps one measurement's allocations (and the allocator's caches) out of another's. ``target``
    reports a failure as ``{"error": message}``.

    Raises:
        RuntimeError: naming ``what``, when the process reports an error or ends without a result.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = None
    while result is None:
        try:
            result = queue.get(timeout=5)
        except Exception:  # queue.Empty: the child is still working, or died without a word
            if not proc.is_alive():
                result = {"error": f"the measuring process ended with exit code {proc.exitcode} and no result"}
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{what} failed: {result['error']}")
    return result


def summarise_seeds(runs: Sequence[dict], split: str, organs: Sequence[str]) -> dict:
    """Per-seed lists of one network on one split, in the protocol's JSON layout."""
    finals = [run["final"][split] for run in runs]
    unrestricted = (
        {"unrestricted_mean_dice": [f["unrestricted_mean_dice"] for f in finals]}
        if all("unrestricted_mean_dice" in f for f in finals) and finals
        else {}
    )
    return unrestricted | {
        "mean_dice": [f["mean_dice"] for f in finals],
        "dice": {o: [f["dice"][o] for f in finals] for o in organs},
        "hd95": {o: [f["hd95"][o] for f in finals] for o in organs},
        "volume_ratio": {o: [f["volume_ratio"][o] for f in finals] for o in organs},
        "outside_body": {o: [f["outside_body"][o] for f in finals] for o in organs},
    }


def verdict(method: Sequence[float], baseline: Sequence[float]) -> dict:
    """The protocol's comparison of two networks' per-seed means on one split.

    One is ahead only when the difference of means exceeds the larger of the two spreads (range of the per-seed
    means). With fewer than two finite seeds for either network there is no spread: the verdict is ``"n/a"``.
    """
    finite_m = [v for v in method if v is not None and np.isfinite(v)]
    finite_b = [v for v in baseline if v is not None and np.isfinite(v)]
    diff = mean_of(finite_m) - mean_of(finite_b)
    if len(finite_m) < 2 or len(finite_b) < 2:
        return {"difference": diff, "spread": float("nan"), "verdict": "n/a (fewer than 2 seeds)"}
    spread = max(float(np.ptp(finite_m)), float(np.ptp(finite_b)))
    if diff > spread:
        word = "ahead"
    elif -diff > spread:
        word = "behind"
    else:
        word = "within the spread"
    return {"difference": diff, "spread": spread, "verdict": word}


def dump_json(path: str, obj: object) -> None:
    """Write JSON with NaN as null (the protocol's files are read by other tools)."""

    def clean(o):
        if isinstance(o, float):
            return o if np.isfinite(o) else None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, (np.floating, np.integer)):
            return clean(o.item())
        return o

    with open(path, "w") as f:
        json.dump(clean(obj), f, indent=1)
