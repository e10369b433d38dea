# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""keep_freed_memory: the training configs' allocator setting (glibc)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BUNDLES
from monai.bundle import ConfigParser

REPO = Path(__file__).parents[1]

# two rounds of eight 16 MB tensors; the page faults of the second round, in MB
SCRIPT = """
import resource, sys, torch
if sys.argv[1] == "1":
    from monai_proto.apps import keep_freed_memory
    assert keep_freed_memory()
def one_round():
    tensors = [torch.ones(4 * 2**20) for _ in range(8)]
    del tensors
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
one_round()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * resource.getpagesize() / 1e6)
"""


def _glibc() -> bool:
    import platform

    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt only")
def test_keep_freed_memory_spares_the_next_step_its_page_faults():
    """A step that frees 128 MB and allocates it again: by default glibc returned it (the second round is faulted in
    again, about 134 MB), with the setting it is reused (measured 17 MB). Each form runs in its own process, since the
    setting is the process's."""
    faults = {}
    for applied in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", SCRIPT, applied], capture_output=True, text=True, check=True)
        faults[applied] = float(out.stdout.strip().splitlines()[-1])
    assert faults["0"] > 64, faults
    assert faults["1"] < 0.5 * faults["0"], faults
    probe = "from monai_proto.apps import freed_memory_kept as f, keep_freed_memory as k; a = f(); k(); print(a, f())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr  # what the benchmark harness records


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("config", ["train.json", "multi_gpu_train.json"])
def test_training_configs_keep_freed_memory_unless_told_not_to(bundle, config, monkeypatch):
    """Every training config's ``initialize`` calls keep_freed_memory, and ``--keep_freed_memory False`` skips it."""
    import monai_proto.apps

    calls = []
    monkeypatch.setattr(monai_proto.apps, "keep_freed_memory", lambda: calls.append(1) or True)
    configs = REPO / "bundles" / bundle / "configs"
    files = [str(configs / "train.json")] + ([str(configs / config)] if config != "train.json" else [])
    for value, expected in ((True, 1), (False, 0)):
        calls.clear()
        parser = ConfigParser()
        parser.read_config(files)
        parser["keep_freed_memory"] = value
        expressions = [e for e in parser["initialize"] if "keep_freed_memory" in str(e)]
        assert len(expressions) == 1  # one call, in the config's own initialize list
        for expression in expressions:  # only this item: the others start a process group or seed the run
            parser["initialize"] = [expression]
            parser.get_parsed_content("initialize", lazy=False)
        assert len(calls) == expected


def test_keep_freed_memory_rejects_thresholds_a_c_int_cannot_hold():
    """mallopt takes a C int: 2**32 would wrap to 0 (trim everything) instead of keeping memory."""
    from monai_proto.apps import keep_freed_memory

    for kwargs in ({"trim_threshold": 2**32}, {"mmap_threshold": -1}):
        with pytest.raises(ValueError, match="C int"):
            keep_freed_memory(**kwargs)
