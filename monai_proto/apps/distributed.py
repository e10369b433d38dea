# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The end of a distributed (DDP) bundle run."""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["shutdown_distributed"]


def shutdown_distributed(network: torch.nn.Module | None = None) -> bool:
    """
    End a distributed run: release the DDP reducer of ``network``, then destroy the default process group. The
    ``finalize`` step of every bundle's ``multi_gpu_train.json``, in place of a bare
    ``torch.distributed.destroy_process_group()``.

    Why the reducer first: ``destroy_process_group()`` drops the process group from the registry, but the DDP reducer
    still holds it, so the group is torn down later, when the network is freed: from the reducer's destructor, with
    the GIL held, while the group's worker thread needs the GIL to free the tensors of the last collective it ran.
    The rank then hangs, or aborts ("terminate called without an active exception", SIGABRT) when this happens during
    interpreter shutdown; torchrun fails the run either way. On a loaded 2-core machine with gloo (PyTorch 2.13)
    that happened in 7 of 45 two-rank runs with a bare ``destroy_process_group()``; with this function in 0 of 15,
    and with the reducer or the whole network deleted by hand first, in 0 of 45 (benchmarks/ddp_shutdown.py,
    docs/benchmarks/ddp_shutdown.md). Released here, the reducer goes while the registry still holds the group; the
    group's last reference is then dropped through the Python ``ProcessGroup`` object (``network.process_group``),
    whose destructor releases the GIL, instead of from the reducer's destructor.

    After this call ``network`` can no longer run a DDP forward or backward pass; ``network.module`` is unchanged
    and still usable (for example to export the trained weights).

    Args:
        network: the run's network, a ``DistributedDataParallel`` (its reducer is released) or any other module or
            None (nothing to release).

    Returns:
        whether a process group was destroyed (False outside a distributed run).
    """
    if isinstance(network, DistributedDataParallel):
        for name in ("logger", "reducer"):  # the DDP logger holds the reducer too
            if hasattr(network, name):
                delattr(network, name)
        gc.collect()  # defensive: frees the reducer now even if a reference cycle holds it (none is known)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False
