# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Helpers that let a bundle config locate itself, so it runs from any working directory."""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Sequence

__all__ = ["default_bundle_root"]


def _config_files_from_argv(argv: Sequence[str]) -> list[str]:
    for i, arg in enumerate(argv):
        value = None
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        value = value.strip()
        if value.startswith("["):
            try:
                return [str(v) for v in ast.literal_eval(value)]
            except (ValueError, SyntaxError):
                return [v.strip(" '\"") for v in value.strip("[]").split(",")]
        return [v for v in value.split(",") if v]
    return []


def default_bundle_root(fallback: str = ".", argv: Sequence[str] | None = None) -> str:
    """The bundle folder of the config given on the command line, else ``fallback``.

    ``python -m monai.bundle run --config_file <bundle>/configs/train.json`` (also under ``torchrun``) gives
    ``<bundle>``: the parent of the ``configs`` folder holding the first config file. MONAI Label and other
    programmatic users set ``bundle_root`` themselves, which overrides this default, as does
    ``--bundle_root``.
    """
    files = _config_files_from_argv(sys.argv if argv is None else argv)
    if not files:
        return os.path.abspath(fallback)
    folder = os.path.dirname(os.path.abspath(files[0]))
    return os.path.dirname(folder) if os.path.basename(folder) == "configs" else folder
