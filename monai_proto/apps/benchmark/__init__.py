# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The one benchmark harness of the project (docs/benchmarks/README.md).

Splits (the A-slab whose labels never train, scan B), training at a budget through a bundle's own config with
held-out curves, scores with the trivial references and volume ratios, interleaved timing, peak memory in a
fresh process, and the JSON / Markdown / PNG writer. The scripts in ``benchmarks/`` only say what differs.
"""

from .harness import IO_HANDLERS, add_arguments, load_run, run_benchmark, run_fingerprint, save_run, strip_io_handlers
from .metrics import mean_of, reference_scores, score_prediction
from .report import gap_closed, pseudo_label_windows, radiological, write_cost_report, write_report
from .runner import (
    SAME_WIDTH_UNET,
    NetworkSpec,
    interleaved_inference_seconds,
    make_parser,
    peak_inference_memory_mb,
    predict_classes,
    summarise_seeds,
    train_with_curves,
    verdict,
)
from .splits import EvaluationSplit, body_mask, describe_split, load_splits, mri_body_mask, region_slices
