# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Draw docs/monailabel_overlay.png from label volumes returned by a running monai-proto MONAI Label server.

    python docs/make_monailabel_figure.py --server http://127.0.0.1:8000 --studies STUDIES [--image scanB_ct]

Calls ``MONAILabelClient.infer`` (the client of Slicer's plugin) for every served model on one study; the
few-shot model gets ``support_value`` 1 (spleen) of the most recently labelled study. Run it in the MONAI Label
environment (README, "MONAI Label and 3D Slicer"), with matplotlib installed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from monailabel.client import MONAILabelClient  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="http://127.0.0.1:8000")
    ap.add_argument("--studies", required=True, help="the server's studies folder (to read the image)")
    ap.add_argument("--image", default="scanB_ct")
    ap.add_argument("--out", default=str(Path(__file__).with_name("monailabel_overlay.png")))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        client = MONAILabelClient(args.server, tmpdir=tmp)
        models = sorted(client.info()["models"])
        image = np.asarray(nib.load(str(Path(args.studies) / f"{args.image}.nii.gz")).dataobj, dtype=np.float32)
        z = image.shape[2] // 2
        panels = []
        for model in models:
            params = {"device": "cpu"}
            if "fewshot" in model:
                params.update({"support_value": 1, "label_name": "spleen"})
            result, info = client.infer(model, args.image, params)
            label = np.asarray(nib.load(result).dataobj)
            if label.shape != image.shape:
                raise ValueError(f"{model}: label shape {label.shape} differs from the study's {image.shape}")
            panels.append((model, label[..., z], info.get("label_names", {})))

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6))
    cmap = plt.get_cmap("tab10")
    for ax, (model, label, names) in zip(np.atleast_1d(axes), panels):
        ax.imshow(np.clip(image[..., z], -200, 300).T, cmap="gray", origin="lower")
        overlay = np.zeros((*label.shape, 4))
        for value in np.unique(label[label > 0]):
            overlay[label == value] = (*cmap(int(value) % 10)[:3], 0.5)
        ax.imshow(overlay.transpose(1, 0, 2), origin="lower")
        shown = [n for n, v in names.items() if v in set(np.unique(label).astype(int))]
        ax.set_title(f"{model}\n{', '.join(shown) or 'nothing on this slice'}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{args.image}, slice {z}: label volumes returned by the MONAI Label server", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
