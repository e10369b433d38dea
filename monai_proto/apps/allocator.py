# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Process-level memory settings for CPU training."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["freed_memory_kept", "keep_freed_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_kept = False  # whether keep_freed_memory has applied its settings in this process


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has applied its settings in this process (what a timing ran under)."""
    return _kept


def keep_freed_memory(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 2**31 - 1) -> bool:
    """
    Let the C allocator keep the memory a training step frees, for the next step, instead of returning it to the
    system (glibc on Linux; elsewhere nothing is changed).

    PyTorch allocates CPU tensors with ``malloc``. By default glibc returns a freed block of more than its dynamic
    mmap threshold, and the free top of its heap beyond the trim threshold, to the system, and the next step's
    tensors are then faulted in again page by page. A network whose step allocates and frees a few hundred MB pays
    that on every step: on this project's 2-core VM, IAPL's training step faulted in about 244 MB a step (MONAI's
    UNet of the same width 0 MB) and took 0.48 s; with these settings 0-17 MB and 0.40-0.42 s, the UNet's step
    unchanged (docs/benchmarks/iapl_cost.md). This is the CPU counterpart of PyTorch's CUDA caching allocator and of
    the jemalloc/tcmalloc preloading that PyTorch's CPU performance guides recommend; the cost is that the process
    keeps its peak memory until it exits. Call it once, early (the bundles' training configs do, in ``initialize``,
    unless ``keep_freed_memory`` is false; MONAI Label's in-process ``BundleTrainTask`` skips ``initialize``);
    it affects the whole process.

    Args:
        mmap_threshold: blocks of at least this many bytes are mapped apart (and returned when freed); glibc accepts
            at most 32 MiB. Defaults to 32 MiB.
        trim_threshold: free memory at the top of the heap kept before any is returned. Defaults to 2**31 - 1.

    Returns:
        whether both settings were applied (False off glibc, e.g. macOS, Windows or musl; True but without effect
        when another allocator, e.g. jemalloc or tcmalloc, is preloaded, which then manages memory its own way). When
        the mmap threshold is applied and the trim threshold is not, the function returns False with the first in
        place (glibc has no call that restores its dynamic thresholds).

    Raises:
        ValueError: when a threshold is outside ``[0, 2**31 - 1]`` (``mallopt`` takes a C ``int``).
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not 0 <= int(value) <= 2**31 - 1:
            raise ValueError(f"{name} must be in [0, 2**31 - 1] (a C int), but got {value}.")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: a trim threshold alone fixes the mmap threshold where it is (128 KiB at first), and
    # every larger tensor would then be mapped and faulted in again (measured: 6x the page faults)
    if mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) != 1:
        return False
    global _kept
    _kept = mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    return _kept
