# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""TorchScript, as the MONAI model zoo exports a bundle: ``torch.jit.script`` (the zoo's default) and tracing give
the eager network's logits, and MONAI's own ``ckpt_export`` writes a TorchScript file that loads and predicts the
same. The network is each bundle's ``network_def`` from its ``inference.json``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import BUNDLES
from monai.bundle import ConfigParser, ckpt_export

import monai_proto  # noqa: F401 - bare _target_ names

REPO = Path(__file__).resolve().parents[1]


def _network(bundle: str) -> torch.nn.Module:
    """The bundle's network with random weights; a few-shot network gets a default support from a synthetic
    example (a bright block in noise), so that its single-input form segments something (zero prototypes would
    give identical all-zero logits on every path)."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def").eval()
    if hasattr(net, "set_default_prototypes"):
        image = torch.rand(1, 1, 32, 32, 32)
        label = torch.zeros(1, 1, 32, 32, 32)
        label[..., 8:20, 10:24, 6:18] = 1
        image[label > 0] += 1.0
        with torch.no_grad():
            net.set_default_prototypes(net.encode_support(image, label))
    return net


@pytest.mark.parametrize("bundle", BUNDLES)
def test_script_and_trace_match_eager(bundle):
    net = _network(bundle)
    x = torch.randn(2, 1, 32, 32, 48)
    with torch.no_grad():
        eager = net(x)
        scripted = torch.jit.script(net)
        traced = torch.jit.trace(net, x, check_trace=False)  # a trace is specialised to its input shape
        assert eager.shape[0] == 2 and eager.shape[2:] == x.shape[2:]
        assert eager.std() > 0  # a real output to compare, not a constant
        torch.testing.assert_close(scripted(x), eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(traced(x), eager, rtol=1e-4, atol=1e-5)
        # another size: the scripted module is not specialised to the first input's shape
        y = torch.randn(1, 1, 48, 32, 32)
        torch.testing.assert_close(scripted(y), net(y), rtol=1e-4, atol=1e-5)
    # the scripted module keeps the training outputs out: train() mode still returns logits, not a Python object
    assert isinstance(scripted.train()(x[:1]), torch.Tensor)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_monai_ckpt_export_scripts_the_bundle(bundle, tmp_path):
    """``python -m monai.bundle ckpt_export`` as the zoo calls it (scripting, the default), then load and run."""
    net = _network(bundle)
    ckpt = tmp_path / "model.pt"
    torch.save({"model": net.state_dict()}, ckpt)  # a bundle checkpoint: {"model": state_dict}
    out = tmp_path / "model.ts"
    configs = REPO / "bundles" / bundle / "configs"
    ckpt_export(
        net_id="network_def",
        filepath=str(out),
        ckpt_file=str(ckpt),
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.json"),
        key_in_ckpt="model",
    )
    extra = {"metadata.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=1e-4, atol=1e-5)
    assert b'"version"' in extra["metadata.json"]  # the bundle's metadata travels in the file
