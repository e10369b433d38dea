# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Helpers that let a bundle config locate itself, so it runs from any working directory."""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Sequence

__all__ = ["MissingCheckpointError", "default_bundle_root", "require_checkpoint"]


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


class MissingCheckpointError(FileNotFoundError):
    """A bundle's inference or evaluation was started before its checkpoint exists."""


def _running_bundle_cli() -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", "") in ("monai.bundle.__main__", "monai.bundle")


def require_checkpoint(ckpt_path: str, bundle_root: str) -> str:
    """Return ``ckpt_path`` if it is a file; else stop with one line naming the file and the command that makes it.

    In a bundle's ``inference.json`` / ``evaluate.json``: ``"initialize": [..., "$monai_proto.apps.require_checkpoint(
    @ckpt_path, @bundle_root)"]``, so a missing checkpoint stops the run before any engine starts. Under
    ``python -m monai.bundle`` the line is printed and the process exits with status 1 (no traceback); called from
    a program (MONAI Label, a notebook) it raises :class:`MissingCheckpointError` with the same message.

    Raises:
        MissingCheckpointError: ``ckpt_path`` does not exist (outside the ``monai.bundle`` command line).
    """
    if os.path.isfile(ckpt_path):
        return ckpt_path
    configs = _config_files_from_argv(sys.argv)
    config_dir = os.path.dirname(os.path.abspath(configs[0])) if configs else os.path.join(bundle_root, "configs")
    train = os.path.join(config_dir, "train.json")
    message = (
        f"{ckpt_path} does not exist: train the bundle first with "
        f"'python -m monai.bundle run training --config_file {train} --bundle_root {bundle_root}' "
        "(or pass --ckpt_path to a trained checkpoint)."
    )
    if _running_bundle_cli():
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1)
    raise MissingCheckpointError(message)
