# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The semi-supervised benchmark (``benchmarks/mpcl.py``) on the shared harness: the protocol split of the MPCL
bundle's ``train.json`` (issue 10: labelled slices, held-out slab, inductive or transductive unlabelled pool), and a
``--smoke`` run that writes the three files with finite numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from monai_proto.apps.benchmark.runner import make_parser

CONFIG = str(REPO_ROOT / "bundles" / "mpcl_semisupervised_segmentation" / "configs" / "train.json")
IGNORE = 255


def _protocol_parser(modality: str, transductive: bool):
    """The bundle config in the protocol split, as the benchmark sets it, without random transforms."""
    return make_parser(
        CONFIG,
        {
            "modality": modality,
            "label_slab_fraction": None,
            "labeled_region": "$@labeled_regions[@modality]",
            "transductive": transductive,
            "transductive_sections": ["test"] if modality == "ct" else [],
            "train#random_transforms": [],
            "train#unlabeled#random_transforms": [],
        },
    )


def _slices(mask: torch.Tensor) -> list[int]:
    """The axial slices (last axis) where a ``(X, Y, Z)`` mask holds a voxel."""
    return torch.nonzero(mask.any(0).any(0)).flatten().tolist()


@pytest.mark.parametrize(
    "modality, labelled, held_out, counts",
    [
        ("ct", range(78, 90), range(90, 102), [1060, 5030, 869, 251, 387, 541]),  # issue 10, item 4
        ("mri", range(6, 10), range(10, 14), [69, 2828, 1033, 543, 127, 91]),
    ],
)
@pytest.mark.parametrize("transductive", [False, True])
def test_protocol_split_labels_and_unlabelled_pool(modality, labelled, held_out, counts, transductive):
    """Only the labelled slices carry labels (the held-out slab never does), the image stays whole, and the
    held-out slab's image is an unlabelled sample only in the transductive variant (with scan B's on CT)."""
    parser = _protocol_parser(modality, transductive)
    (item,) = parser.get_parsed_content("train#datalist")
    data = parser.get_parsed_content("train#preprocessing")(dict(item))
    label = data["label"][0]
    assert _slices(label != IGNORE) == list(labelled)
    assert [int((label == c).sum()) for c in range(1, 7)] == counts
    assert data["image"].shape == data["label"].shape  # the whole volume is context, nothing is cut
    unlabelled = parser.get_parsed_content("train#unlabeled#datalist")
    assert all("label" not in u for u in unlabelled)
    expected = ["scanA_ct.nii.gz", "scanB_ct_dicom"] if modality == "ct" and transductive else None
    if expected:
        assert [os.path.basename(u["image"]) for u in unlabelled] == expected
    else:
        assert len(unlabelled) == 1
    image = parser.get_parsed_content("train#unlabeled#preprocessing")(dict(unlabelled[0]))["image"][0]
    blank = torch.nonzero((image == 0).all(0).all(0)).flatten().tolist()  # slices that are background only
    assert blank == ([] if transductive else list(held_out))
    # fully supervised: every label outside the held-out slab
    parser["labeled_region"] = None
    (item,) = parser.get_parsed_content("train#datalist")
    label = parser.get_parsed_content("train#preprocessing")(dict(item))["label"][0]
    assert sorted(set(range(label.shape[-1])) - set(_slices(label != IGNORE))) == list(held_out)


@pytest.mark.slow  # five networks (four trained 2 iterations, MONAI's UNet timed), about 4 minutes on 2 cores
def test_mpcl_benchmark_smoke(tmp_path):
    """``--smoke`` (CT, inductive) trains the four networks a few iterations, times them beside MONAI's UNet and writes
    the three files with finite numbers; no quality figure is asserted."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "mpcl.py"), "--smoke", "--out", str(tmp_path),
           "--workdir", str(tmp_path / "work"), "--repeats", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"mpcl.{ext}").stat().st_size > 0
    result = json.loads((tmp_path / "mpcl.json").read_text())
    assert "per-class pseudo-label thresholds at q 0.5" in result["title"]
    nets = ["MPCLNet", "supervised_only", "mean_teacher", "fully_supervised"]
    assert [result["method"], *result["baselines"]] == nets and result["cost_reference"] == "UNet"
    for split in ("A-slab", "B"):
        entries = result["results"][split]
        for net in nets:
            assert all(math.isfinite(v) for v in entries[net]["mean_dice"]), (split, net)
            assert set(entries[net]["volume_ratio"]) == set(result["organs"])
        assert 0 < entries["body_mask"]["mean_dice"] < 1 and entries["empty"]["mean_dice"] == 0
        assert set(result["gap_closed"][split]) == {"MPCLNet", "mean_teacher"}
        assert "mean_teacher vs supervised_only" in result["comparison_verdicts"][split]
    speed = result["speed"]
    assert speed["reference"] == "UNet" and set(speed["training_step_seconds"]) == {*nets, "UNet"}
    assert all(speed[k] > 0 for k in ("throughput_ratio", "memory_ratio", "train_time_ratio"))
    assert speed["wall_train_time_ratio"] is None  # the cost reference is not trained
    assert all(len(result["curves"][net]["0"]["iterations"]) >= 2 for net in nets)
    # the pseudo-labels the teacher gave (running counts of PrototypeBankHandler) are in the curves and the report
    mpcl_points = result["curves"]["MPCLNet"]["0"]["train_metrics"]
    assert len(mpcl_points) == len(result["curves"]["MPCLNet"]["0"]["iterations"])
    assert mpcl_points[-1]["pseudo_unlabelled_voxels"] > 0
    assert all("pseudo_unlabelled_voxels" not in p for p in result["curves"]["supervised_only"]["0"]["train_metrics"])
    report = (tmp_path / "mpcl.md").read_text()
    assert "SMOKE RUN" in report and "## Pseudo-labels" in report


@pytest.mark.slow  # one network trained 2 iterations, two timed, about a minute on 2 cores
def test_partial_run_with_one_global_threshold(tmp_path):
    """``--networks MPCLNet --class_quantile off --trust_region on --trust_radius_end 36`` trains MPCL alone with one
    ramped pseudo-label threshold (the bundle's default is per class) and the pseudo-label trust region growing to
    36 mm (the bundle's is off), and writes ``mpcl_global_threshold_trust_region_on_radius_36.*``: no baseline, no
    verdict among untrained networks, the pseudo-labels reported."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "mpcl.py"), "--smoke", "--networks", "MPCLNet",
           "--class_quantile", "off", "--trust_region", "on", "--trust_radius_end", "36", "--out", str(tmp_path),
           "--workdir", str(tmp_path / "work"), "--repeats", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = "mpcl_global_threshold_trust_region_on_radius_36"
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["baselines"] == [] and list(result["curves"]) == ["MPCLNet"] and result["bounds"] is None
    assert result["comparisons"] == [] and "one ramped pseudo-label threshold" in result["title"]
    assert "pseudo-label trust region 6 -> 36 mm" in result["title"]
    assert "## Pseudo-labels" in (tmp_path / f"{name}.md").read_text()
    bad = subprocess.run([*cmd[:3], "--networks", "mean_teacher"], capture_output=True, encoding="utf-8", env=env)
    assert bad.returncode != 0 and "must name the method" in bad.stderr


@pytest.mark.slow  # five networks timed on a coarse grid, about a minute on 2 cores
def test_cost_only_run_trains_nothing(tmp_path):
    """``--cost_only`` times the four networks beside MONAI's UNet at their initial weights and writes only the cost
    files: no Dice, no curves, no wall-time figures of training runs."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "mpcl.py"), "--smoke", "--cost_only", "--out",
           str(tmp_path), "--workdir", str(tmp_path / "work"), "--repeats", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["mpcl_cost.json", "mpcl_cost.md"]
    assert "== training" not in proc.stdout
    result = json.loads((tmp_path / "mpcl_cost.json").read_text())
    assert result["results"] == {} and all(not curves for curves in result["curves"].values())
    speed = result["speed"]
    assert speed["seconds_per_iteration"] == {} and speed["wall_train_time_ratio"] is None
    assert set(speed["inference_seconds"]) == {"MPCLNet", "supervised_only", "mean_teacher", "fully_supervised", "UNet"}
    assert all(speed[k] > 0 for k in ("throughput_ratio", "memory_ratio", "train_time_ratio"))
    text = (tmp_path / "mpcl_cost.md").read_text()
    assert "MPCLNet vs UNet: throughput" in text and "Dice" not in text and "s/iteration" not in text


@pytest.mark.slow  # loads scan A and scores 20 slices twice, about 30 s on 2 cores
def test_slice_profile_scores_stored_predictions_slice_by_slice(tmp_path):
    """``benchmarks/slice_profile.py`` reads a ``--resume`` workdir's stored A-slab predictions: the true label map
    scores Dice 1 with no background painted on every slice; a map that labels the body's background as liver paints
    all of it, and its Dice falls on the slices where liver is not all there is; the means over the held-out and the
    unlabelled slices are in the report."""
    from monai.transforms import Compose

    from monai_proto.apps.benchmark.harness import save_run
    from monai_proto.apps.benchmark.splits import load_splits

    parser = make_parser(CONFIG, {})
    deterministic = parser.get_parsed_content("train#deterministic_transforms")
    split = load_splits(
        Compose(list(deterministic)), parser.get_parsed_content("dataset_dir"), parser.get_parsed_content("pixdim")
    )[0]
    truth = split.label[0, 0].long()
    liver = 1 + parser.get_parsed_content("organs").index("liver")
    painted = torch.where((truth == 0) & split.body, torch.full_like(truth, liver), truth)
    for name, prediction in (("truth", truth), ("painter", painted)):
        record = {"fingerprint": "x", "commit": "c", "date": "d", "run": {"prediction": {"A-slab": prediction}}}
        save_run(str(tmp_path / "runs" / f"{name}_seed0.pt"), record)
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "slice_profile.py"), "--workdir", str(tmp_path),
           "--out", str(tmp_path), "--name", "profile", "--slices", "74", "93"]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "profile.json").read_text())["rows"]
    assert [r["slice"] for r in rows] == list(range(74, 94))
    assert [r["kind"] for r in rows] == ["unlabelled"] * 4 + ["fit"] * 12 + ["held out"] * 4
    assert [r["distance"] for r in rows[:4]] == [4, 3, 2, 1] and rows[-1]["distance"] == 4
    for row in rows:
        assert row["truth"]["mean_dice"] == [pytest.approx(1.0)] and row["truth"]["background_painted"] == [0.0]
        assert row["painter"]["background_painted"] == [1.0]
        assert row["painter"]["mean_dice"][0] < 0.99
    report = (tmp_path / "profile.md").read_text()
    (line,) = [line for line in report.splitlines() if line.startswith("| 80 | fit | 0 | ")]
    assert line.endswith("/ 1.00 | 1.00 / 0.00 |")  # the painter's column, then the truth's
    assert "truth 1.000" in next(line for line in report.splitlines() if line.startswith("- held out (4 slices)"))


@pytest.mark.slow  # loads scan A and predicts three 64-slice windows, about 30 s on 2 cores
def test_window_position_reports_each_slice_by_window_depth(tmp_path):
    """``benchmarks/window_position.py`` predicts each window alone and reports, per slice and window start, the
    share of the body's background painted and the slice's depth in that window; a network whose organ logits are
    switched off paints nothing, one whose background logit is switched off paints everything."""
    from monai_proto.networks.utils import unwrap_network

    parser = make_parser(CONFIG, {})
    network = unwrap_network(parser.get_parsed_content("network_def"))
    head = network.segmentation_head
    for painter, value in (("none", (10.0, -10.0)), ("all", (-10.0, 10.0))):
        with torch.no_grad():
            for p in head.parameters():
                p.zero_()
            head.bias[0], head.bias[1:] = value
        torch.save({"model": network.state_dict()}, tmp_path / f"{painter}.pt")
        cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "window_position.py"), "--checkpoint",
               str(tmp_path / f"{painter}.pt"), "--starts", "0", "24", "48", "--out", str(tmp_path),
               "--name", painter]  # fmt: skip
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        result = json.loads((tmp_path / f"{painter}.json").read_text())
        assert result["starts"] == [0, 24, 48] and result["depth"] == 64
        assert set(result["rows"]["60"]) == {"0", "24", "48"} and set(result["rows"]["100"]) == {"48"}
        shares = [v for row in result["rows"].values() for v in row.values()]
        assert all(v == (0.0 if painter == "none" else 1.0) for v in shares if not math.isnan(v))
        assert "| 60 | " in (tmp_path / f"{painter}.md").read_text()
