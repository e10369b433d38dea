# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The benchmark harness: scores, references, verdicts, orientation, and a --smoke run of the IAPL benchmark."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from monai_proto.apps.benchmark import (
    EvaluationSplit,
    load_run,
    mri_body_mask,
    pseudo_label_windows,
    radiological,
    reference_scores,
    run_fingerprint,
    save_run,
    score_prediction,
    verdict,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORGANS = ["a", "b"]


def _split(region_slices=slice(None)):
    label = torch.zeros(1, 1, 10, 10, 10, dtype=torch.long)
    label[0, 0, 2:4, 2:4, :] = 1  # organ a: 40 voxels
    label[0, 0, 6:9, 6:9, :] = 2  # organ b: 90 voxels
    region = torch.zeros(10, 10, 10, dtype=torch.bool)
    region[:, :, region_slices] = True
    body = torch.zeros(10, 10, 10, dtype=torch.bool)
    body[1:9, 1:9, :] = True  # 640 voxels
    return EvaluationSplit("t", torch.zeros(1, 1, 10, 10, 10), label, region, body, (1.0, 1.0, 1.0))


def test_perfect_and_doubled_predictions():
    split = _split()
    perfect = score_prediction(split.label, split, ORGANS)
    assert perfect["mean_dice"] == pytest.approx(1.0)
    assert perfect["volume_ratio"] == {"a": 1.0, "b": 1.0}
    assert perfect["hd95"]["a"] == pytest.approx(0.0)
    pred = split.label.clone()
    pred[0, 0, 4:6, 2:4, :] = 1  # organ a painted twice its size
    doubled = score_prediction(pred, split, ORGANS)
    assert doubled["dice"]["a"] == pytest.approx(2 * 40 / (80 + 40))
    assert doubled["volume_ratio"]["a"] == pytest.approx(2.0)


def test_share_of_the_prediction_outside_the_body():
    """A network that paints the air around the patient is told apart from one that over-segments inside the body:
    the share of an organ's predicted voxels (in the region) outside the body mask."""
    split = _split()
    assert score_prediction(split.label, split, ORGANS)["outside_body"] == {"a": 0.0, "b": 0.0}
    pred = split.label.clone()
    pred[0, 0, 0, :, :] = 1  # a row of air (outside the body: x = 0) painted as organ a: 100 voxels
    pred[0, 0][split.label[0, 0] == 2] = 0  # organ b not predicted at all
    scores = score_prediction(pred, split, ORGANS)
    assert scores["outside_body"]["a"] == pytest.approx(100 / 140)
    assert math.isnan(scores["outside_body"]["b"])
    inside = split.label.clone()
    inside[0, 0, 4:6, 2:4, :] = 1  # over-segmented inside the body
    assert score_prediction(inside, split, ORGANS)["outside_body"]["a"] == 0.0
    sliced = _split(slice(0, 5))  # only the region counts
    assert score_prediction(pred, sliced, ORGANS)["outside_body"]["a"] == pytest.approx(50 / 70)


def test_region_limits_what_is_scored():
    split = _split(slice(0, 5))  # only the first 5 slices count
    pred = split.label.clone()
    pred[..., 5:] = 0  # wrong outside the region: no effect
    scores = score_prediction(pred, split, ORGANS)
    assert scores["mean_dice"] == pytest.approx(1.0)
    empty_b = _split(slice(0, 5))
    empty_b.label[0, 0][empty_b.label[0, 0] == 2] = 0
    assert math.isnan(score_prediction(empty_b.label, empty_b, ORGANS)["dice"]["b"])  # absent organ: not scored


def test_trivial_references():
    split = _split()
    refs = reference_scores(split, ORGANS)
    assert refs["empty"]["mean_dice"] == 0.0
    assert refs["body_mask"]["dice"]["a"] == pytest.approx(2 * 40 / (640 + 40))
    assert refs["body_mask"]["volume_ratio"]["b"] == pytest.approx(640 / 90)


def test_verdict_follows_the_protocol():
    assert verdict([0.60, 0.62], [0.50, 0.55])["verdict"] == "ahead"  # 0.085 > spread 0.05
    assert verdict([0.60, 0.62], [0.55, 0.62])["verdict"] == "within the spread"
    assert verdict([0.40, 0.41], [0.50, 0.52])["verdict"] == "behind"
    assert verdict([0.60], [0.10])["verdict"].startswith("n/a")  # one seed has no spread
    assert verdict([0.60, float("nan")], [0.10, 0.12])["verdict"].startswith("n/a")


def test_pseudo_label_windows_are_differences_of_the_running_counts():
    """The report's pseudo-label table takes what passed the threshold between two curve points from the handler's
    running counts of the epoch, and starts afresh when a new epoch reset them."""
    point = lambda voxels, a, b: {"pseudo_unlabelled_voxels": voxels, "pseudo_a_count": a, "pseudo_b_count": b}  # noqa: E731
    curve = {
        "iterations": [5, 10, 15, 20],
        "train_metrics": [{"loss_x": 1.0}, point(100, 0, 10), point(300, 20, 30), point(100, 5, 5)],  # epoch 2 at 20
    }
    windows = pseudo_label_windows(curve, ["a", "b"])
    assert [(w["start"], w["end"]) for w in windows] == [(0, 10), (10, 15), (15, 20)]
    assert windows[0]["count"] == {"a": 0, "b": 10} and windows[0]["fraction"]["b"] == pytest.approx(0.1)
    assert windows[1]["count"] == {"a": 20, "b": 20} and windows[1]["fraction"]["a"] == pytest.approx(0.1)
    assert windows[2]["count"] == {"a": 5, "b": 5} and windows[2]["voxels"] == 100  # reset: not negative
    assert pseudo_label_windows({"iterations": [5], "train_metrics": [{}]}, ["a"]) == []


def test_radiological_orientation():
    """RAS axial slice [x, y]: patient's right (low x... high x is Right) on the viewer's left, anterior on top."""
    axial = np.zeros((4, 3))
    axial[3, 2] = 1  # most right (x high) and most anterior (y high)
    shown = radiological(axial)
    assert shown.shape == (3, 4) and shown[0, 0] == 1


@pytest.mark.slow
def test_iapl_benchmark_smoke(tmp_path):
    """--smoke trains both networks a few iterations and writes the three files with finite numbers."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "iapl.py"),
        "--smoke",
        "--out",
        str(tmp_path),
        "--workdir",
        str(tmp_path / "work"),
        "--repeats",
        "1",
        "--save_models",
    ]
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"iapl.{ext}").stat().st_size > 0
    result = json.loads((tmp_path / "iapl.json").read_text())
    for net in ("IAPLNet", "UNet"):  # --save_models: each run's final weights, loadable as tensors only
        for seed in result["seeds"]:
            weights = torch.load(tmp_path / "work" / f"{net}_seed{seed}.pt", weights_only=True)
            assert weights and all(isinstance(v, torch.Tensor) for v in weights.values())
    assert result["method"] == "IAPLNet" and result["baselines"] == ["UNet"]
    for split in ("A-slab", "B"):
        entries = result["results"][split]
        for net in ("IAPLNet", "UNet"):
            assert all(math.isfinite(v) for v in entries[net]["mean_dice"])
            assert set(entries[net]["volume_ratio"]) == set(entries[net]["outside_body"]) == set(result["organs"])
        assert 0 < entries["body_mask"]["mean_dice"] < 1 and entries["empty"]["mean_dice"] == 0
    assert result["splits"]["A-slab"]["region_box"][2] == [45, 51]  # the slab on the smoke run's 6 mm grid
    speed = result["speed"]
    assert all(speed[k] > 0 for k in ("throughput_ratio", "memory_ratio", "train_time_ratio", "wall_train_time_ratio"))
    assert set(speed["training_step_seconds"]) == {"IAPLNet", "UNet"}
    steps = speed["training_step_seconds"]
    assert speed["train_time_ratio"] == steps["IAPLNet"] / steps["UNet"]
    assert set(speed["other_processes_cores"]) == {"before", "after"}
    # training ran the config's initialize (keep_freed_memory) before any timing, and the report says so
    kept = "keep_freed_memory" if platform.libc_ver()[0] == "glibc" else "default"
    assert speed["allocator"] == {"inference": kept, "training_step": kept}
    assert f"inference timed with {kept}" in (tmp_path / "iapl.md").read_text()
    assert len(result["curves"]["IAPLNet"]["0"]["iterations"]) >= 2
    assert "SMOKE RUN" in (tmp_path / "iapl.md").read_text()


def test_mri_body_mask_is_the_filled_otsu_foreground():
    x = torch.zeros(1, 40, 40, 6)
    yy, xx = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    body = ((yy - 20) ** 2 + (xx - 20) ** 2) < 15**2
    x[0][body] = 100.0  # bright fat
    x[0][((yy - 20) ** 2 + (xx - 20) ** 2) < 5**2] = 5.0  # a dark organ inside the body
    x[0, 2:4, 2:4] = 100.0  # a small bright speck outside: not the largest component
    mask = mri_body_mask(x)
    assert mask.shape == (40, 40, 6)
    assert bool(mask[20, 20].all())  # the dark organ is inside the body: holes are filled
    assert not bool(mask[3, 3].any())
    assert abs(int(mask[..., 0].sum()) - int(body.sum())) <= 0.05 * int(body.sum())


def test_mri_split_is_the_held_out_slab_with_an_otsu_body_mask():
    from monai.transforms import Compose

    from monai_proto.apps.benchmark.runner import make_parser
    from monai_proto.apps.benchmark.splits import load_splits

    config = os.path.join(REPO, "bundles", "iapl_segmentation", "configs", "train.json")
    parser = make_parser(config, {"modality": "mri"})
    (split,) = load_splits(
        Compose(parser.get_parsed_content("train#deterministic_transforms")),
        parser.get_parsed_content("dataset_dir"),
        parser.get_parsed_content("pixdim"),
        {"MRI-slab": "validation"},
        modality="mri",
    )
    assert split.region_box[2] == slice(10, 14)  # slices 10-13 of the MRI's 3 mm RAS grid
    organs = split.label[0, 0] > 0
    assert float((split.body & organs).sum()) >= 0.9 * float(organs.sum())  # the organs lie in the body
    assert 0.1 < float(split.body.float().mean()) < 0.9  # neither empty nor the whole field of view
    refs = reference_scores(split, list(parser.get_parsed_content("organs")))
    assert 0 < refs["body_mask"]["mean_dice"] < 0.2


def test_mri_refuses_splits_built_for_ct_and_the_few_shot_supports_follow_their_modality():
    """``--modality mri`` scores only splits a benchmark names ``MRI...`` (a CT-named split would be the MRI scored
    under a CT name); the few-shot benchmark's supports are cut from each modality's own training scan, through its
    own preset, with the organ as 1 and the held-out slab ignored."""
    import argparse
    import importlib.util

    from monai_proto.apps.benchmark import NetworkSpec, run_benchmark
    from monai_proto.apps.benchmark.runner import make_parser

    args = argparse.Namespace(modality="mri", threads=1)
    with pytest.raises(ValueError, match="built for the CT data"):
        run_benchmark(
            name="x", title="x", bundle="x", config_file="x", method=NetworkSpec("IPLSLNet"), baselines=[], args=args,
            sections={"A-slab 1-shot": "validation"},
        )  # fmt: skip
    spec = importlib.util.spec_from_file_location("iplsl_benchmark", os.path.join(REPO, "benchmarks", "iplsl.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    crops = {}
    for modality in ("mri", "ct"):
        overrides = {"modality": modality, **bench.SMOKE}
        if modality == "mri":
            overrides["train_organs"] = bench.MRI_TRAIN_ORGANS
        parser = make_parser(bench.CONFIG, overrides)
        assert parser.get_parsed_content("train_classes")  # every MRI training organ is in the MRI's label table
        crops[modality] = bench.support_crops(parser, list(parser.get_parsed_content("test_organs")))
    for modality, by_organ in crops.items():
        assert set(by_organ) == {"liver", "spleen", "stomach"}
        for organ, shots in by_organ.items():
            assert len(shots) == bench.MAX_SHOTS
            first = shots[0]["label"]
            assert set(torch.unique(first).tolist()) <= {0, 1, 255} and (first == 1).any(), (modality, organ)
    # the presets differ: CT scaled from a HU window to [0, 1], MRI z-scored per volume
    ct, mr = crops["ct"]["liver"][0]["image"], crops["mri"]["liver"][0]["image"]
    assert float(ct.min()) >= 0.0 and float(ct.max()) <= 1.0
    assert float(mr.min()) < 0.0


def test_other_processes_cores_sees_a_busy_process_and_the_report_flags_it():
    import threading

    from monai_proto.apps.benchmark.report import _cost_lines
    from monai_proto.apps.benchmark.runner import CONTENDED_CORES, other_processes_cores

    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        own = other_processes_cores(1.0)  # this process's own busy thread is not another process's load
    finally:
        stop.set()
        spinner.join()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        load = other_processes_cores(1.0)
    finally:
        busy.kill()
        busy.wait()
    if load is None or own is None:
        pytest.skip("no /proc/stat here")
    assert load > 0.6 and load - own > 0.5  # one spinning process is about one core; our own spinning is not

    speed = {
        "reference": "UNet",
        "seconds_per_iteration": {},
        "inference_seconds": {"Net": 2.0, "UNet": 1.0},
        "peak_memory_mb": {"Net": 2.0, "UNet": 1.0},
        "training_step_seconds": {"Net": 2.0, "UNet": 1.0},
        "parameters": {"Net": 1e6, "UNet": 1e6},
        "volume": "v",
        "voxels": 8,
        "repeats": 1,
        "memory_kind": "RSS",
        "training_step_repeats": 2,
        "throughput_ratio": 0.5,
        "memory_ratio": 2.0,
        "train_time_ratio": 2.0,
        "wall_train_time_ratio": None,
    }
    result = {"method": "Net", "baselines": ["UNet"], "speed": speed}
    text = "\n".join(_cost_lines(result, "## Cost"))
    assert "not sampled" in text and "Contended" not in text
    speed["other_processes_cores"] = {"before": 0.05, "after": None}
    text = "\n".join(_cost_lines(result, "## Cost"))
    assert "at most 0.05 cores" in text and "Contended" not in text
    speed["other_processes_cores"] = {"before": 0.05, "after": CONTENDED_CORES + 0.7}
    assert "Contended" in "\n".join(_cost_lines(result, "## Cost"))


@pytest.mark.slow
def test_method_only_partial_run_times_its_baseline_for_cost_only(tmp_path):
    """--networks with the method alone trains and scores it alone; its first baseline is still timed beside it, at
    initial weights, so the cost ratios have a reference (the run used to fail there)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "iapl.py"), "--smoke", "--networks", "IAPLNet"]
    cmd += ["--seeds", "0", "--out", str(tmp_path), "--workdir", str(tmp_path / "work"), "--repeats", "1"]
    proc = subprocess.run(
        cmd + ["--resume"], capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "iapl.json").read_text())
    assert set(result["results"]["A-slab"]) == {"IAPLNet", "body_mask", "empty"}  # UNet neither trained nor scored
    assert result["cost_reference"] == "UNet" and result["speed"]["reference"] == "UNet"
    assert set(result["speed"]["training_step_seconds"]) == {"IAPLNet", "UNet"}
    assert result["speed"]["throughput_ratio"] > 0
    # --resume: the same command again reuses the stored run (no training) and reports the same figures
    assert "training IAPLNet, seed 0" in proc.stdout and "resumed_runs" not in result
    again = subprocess.run(
        cmd + ["--resume"], capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=900
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reusing IAPLNet, seed 0" in again.stdout and "training IAPLNet" not in again.stdout
    second = json.loads((tmp_path / "iapl.json").read_text())
    assert second["results"] == result["results"] and second["curves"] == result["curves"]
    assert set(second["resumed_runs"]) == {"IAPLNet_seed0"}
    assert "Trained by an earlier process of this command" in (tmp_path / "iapl.md").read_text()


def test_shared_arguments_parse_the_documented_options():
    """The options the docs name (docs/benchmarks/README.md, docs/inputs.md) exist, with the documented defaults."""
    import argparse

    from monai_proto.apps.benchmark import add_arguments

    parse = add_arguments(argparse.ArgumentParser(), 300, 3).parse_args
    args = parse([])
    assert args.body_restriction == "on" and args.resume is False and args.iterations == 300 and args.seeds == [0, 1]
    args = parse(["--body_restriction", "off", "--resume", "--workdir", "/w"])
    assert args.body_restriction == "off" and args.resume and args.workdir == "/w"
    with pytest.raises(SystemExit):
        parse(["--body_restriction", "raw"])


def test_stored_runs_are_reused_only_by_the_same_code_and_settings(tmp_path, monkeypatch):
    """--resume's store: a run is reused only under the fingerprint it was trained with (the script, the config,
    the overrides and settings all count), is written whole or not at all, and an unreadable file is trained again."""
    config = tmp_path / "train.json"
    config.write_text('{"lr": 0.001}')
    script = tmp_path / "bench.py"
    script.write_text("print(1)\n")
    monkeypatch.setattr(sys, "argv", [str(script)])
    key = run_fingerprint(str(config), {"seed": 0}, {"network": "A"})
    assert key == run_fingerprint(str(config), {"seed": 0}, {"network": "A"})
    assert key != run_fingerprint(str(config), {"seed": 1}, {"network": "A"})
    assert key != run_fingerprint(str(config), {"seed": 0}, {"network": "B"})
    script.write_text("print(2)\n")
    assert key != run_fingerprint(str(config), {"seed": 0}, {"network": "A"})
    script.write_text("print(1)\n")
    config.write_text('{"lr": 0.01}')
    assert key != run_fingerprint(str(config), {"seed": 0}, {"network": "A"})
    config.write_text('{"lr": 0.001}')
    assert key == run_fingerprint(str(config), {"seed": 0}, {"network": "A"})

    path = tmp_path / "runs" / "A_seed0.pt"
    run = {
        "curve": {"iterations": [1, 2], "A-slab": [0.1, float("nan")], "train_metrics": [{}, {"x": 1.0}]},
        "state_dict": {"w": torch.ones(2)},
        "prediction": {"A-slab": torch.zeros(3, dtype=torch.uint8)},
        "final": {"A-slab": {"mean_dice": 0.5, "dice": {"a": float("nan")}}},
        "seconds_per_iteration": 1.5,
    }
    save_run(str(path), {"fingerprint": key, "commit": "abc1234", "date": "2026-12-05", "run": run})
    assert os.listdir(path.parent) == ["A_seed0.pt"]  # no partial file left behind
    lines: list[str] = []
    record = load_run(str(path), key, lines.append)
    assert record["commit"] == "abc1234" and torch.equal(record["run"]["state_dict"]["w"], torch.ones(2))
    assert record["run"]["curve"]["iterations"] == [1, 2] and math.isnan(record["run"]["curve"]["A-slab"][1])
    assert load_run(str(path), "0" * 64, lines.append) is None and "other code or settings" in lines[-1]
    assert load_run(str(tmp_path / "runs" / "B_seed0.pt"), key, lines.append) is None
    path.write_bytes(b"half a file")
    assert load_run(str(path), key, lines.append) is None and "unreadable" in lines[-1]
