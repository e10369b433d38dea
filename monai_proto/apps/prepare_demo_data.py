# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""
Rebuild the embedded demo data set (``monai_proto/data/demo``) from the TotalSegmentator source
distribution, so that the copy shipped in this package can be verified against PyPI.

Usage::

    python -m monai_proto.apps.prepare_demo_data --output DIR [--sdist totalsegmentator-2.18.0.tar.gz]

Without ``--sdist`` the source distribution is fetched with
``pip download --no-deps --no-binary :all: totalsegmentator==2.18.0`` into a temporary folder.

The image and label files are copied byte for byte (only renamed); ``labels.json``,
``dataset.json`` (MSD layout), ``NOTICE`` and ``provenance.json`` (sha256 of every copied file and
of the source distribution) are written next to them. Nothing in the output depends on the time or
the machine, so running the command twice gives identical files.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import posixpath
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence

import nibabel as nib
import numpy as np

__all__ = [
    "PACKAGE_NAME",
    "PACKAGE_VERSION",
    "MRI_SOURCE_FILES",
    "SOURCE_FILES",
    "download_sdist",
    "main",
    "prepare_demo_data",
    "read_total_class_map",
]

PACKAGE_NAME = "TotalSegmentator"
PACKAGE_VERSION = "2.18.0"
PACKAGE_URL = "https://github.com/wasserth/TotalSegmentator"
PYPI_URL = f"https://pypi.org/project/TotalSegmentator/{PACKAGE_VERSION}/"
REFERENCE = (
    "Wasserthal J. et al., TotalSegmentator: Robust Segmentation of 104 Anatomic Structures in CT "
    "Images. Radiology: Artificial Intelligence 2023;5(5):e230024. https://doi.org/10.1148/ryai.230024"
)

#: sdist member (relative to the sdist's top folder) -> path in the output folder.
#: A member ending in "/" is a folder whose files are copied under their original names.
SOURCE_FILES: dict[str, str] = {
    "tests/reference_files/example_ct.nii.gz": "imagesTr/scanA_ct.nii.gz",
    "tests/reference_files/example_seg_fast_force_split.nii.gz": "labelsTr/scanA_seg.nii.gz",
    "tests/reference_files/example_ct_dicom/": "imagesTs/scanB_ct_dicom/",
    "tests/reference_files/example_seg_dicom.nii.gz": "labelsTs/scanB_seg.nii.gz",
    "LICENSE": "LICENSE.TotalSegmentator",
}
CLASS_MAP_MEMBER = "totalsegmentator/map_to_binary.py"

SCANS = {
    "scanA": {"image": "imagesTr/scanA_ct.nii.gz", "label": "labelsTr/scanA_seg.nii.gz"},
    "scanB": {"image": "imagesTs/scanB_ct_dicom", "label": "labelsTs/scanB_seg.nii.gz"},
}
#: The benchmark protocol's held-out slab of scan A: slices [90, 102) of its RAS-oriented 3 mm grid (pancreas
#: level; every default organ crosses it). It is stored in ``dataset.json`` as a world-coordinate range, so it
#: holds on any resampled grid.
A_SLAB_SLICES = (90, 102)

#: The MRI demo data set (``monai_proto/data/demo_mri``, ``--dataset mri``): one abdominal MRI of the same source
#: distribution with TotalSegmentator's ``total_mr`` labels (other class numbers than CT: select classes by name).
MRI_SOURCE_FILES: dict[str, str] = {
    "tests/reference_files/example_mr_sm.nii.gz": "imagesTr/mri_mr.nii.gz",
    "tests/reference_files/example_seg_mr.nii.gz": "labelsTr/mri_seg.nii.gz",
    "LICENSE": "LICENSE.TotalSegmentator",
}
MRI_SCANS = {"mri": {"image": "imagesTr/mri_mr.nii.gz", "label": "labelsTr/mri_seg.nii.gz"}}
#: Held-out slab of the MRI (117 x 91 x 20 at 3 mm): slices [10, 14) of its RAS grid, where all six default organs
#: are present (spleen 81-153 voxels per slice, pancreas 60-131); their labels never train.
MRI_SLAB_SLICES = (10, 14)

# folders and files this tool owns in the output folder (cleared by --overwrite)
_OUTPUT_ENTRIES = (
    "imagesTr",
    "labelsTr",
    "imagesTs",
    "labelsTs",
    "LICENSE.TotalSegmentator",
    "labels.json",
    "dataset.json",
    "NOTICE",
    "provenance.json",
)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: str, obj: object) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def download_sdist(dest_dir: str, version: str = PACKAGE_VERSION) -> str:
    """
    Download the TotalSegmentator source distribution with pip (no dependencies, no wheels).

    Args:
        dest_dir: folder that receives the ``.tar.gz``.
        version: TotalSegmentator version to fetch.

    Returns:
        Path of the downloaded ``.tar.gz``.

    Raises:
        RuntimeError: when pip fails or produces no ``.tar.gz``.
    """
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        f"totalsegmentator=={version}", "-d", dest_dir,
    ]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"'{' '.join(cmd)}' failed with exit code {proc.returncode}; pass a downloaded source "
            f"distribution with --sdist instead.\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    found = sorted(f for f in os.listdir(dest_dir) if f.lower().endswith(".tar.gz"))
    if not found:
        raise RuntimeError(f"pip download finished but no .tar.gz was written to {dest_dir}: {os.listdir(dest_dir)}.")
    return os.path.join(dest_dir, found[0])


def read_total_class_map(source: str, filename: str = CLASS_MAP_MEMBER, task: str = "total") -> dict[int, str]:
    """
    Parse TotalSegmentator's ``class_map[task]`` (id -> name; ``"total"`` for CT, ``"total_mr"`` for MRI) from
    the source text of ``map_to_binary.py`` without importing the package (its dependencies are not needed).

    Args:
        source: the Python source of ``map_to_binary.py``.
        filename: name used in error messages.
        task: the class map's key.

    Raises:
        ValueError: when no literal ``class_map = {...}`` with a ``task`` entry is found.
    """
    tree = ast.parse(source, filename=filename)
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "class_map"
        ):
            class_map = ast.literal_eval(node.value)
            if task not in class_map:
                raise ValueError(f"{filename}: class_map has no {task!r} entry (keys: {sorted(class_map)}).")
            return {int(k): str(v) for k, v in sorted(class_map[task].items())}
    raise ValueError(f"{filename}: no top-level literal assignment 'class_map = {{...}}' found.")


class _Sdist:
    """Read members of a source distribution tarball by their path below its top folder."""

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"source distribution not found: {path}")
        self.path = path
        self.tar = tarfile.open(path, "r:gz")  # noqa: SIM115 - closed by close() in a finally block
        self.members = {m.name: m for m in self.tar.getmembers()}
        tops = {name.split("/", 1)[0] for name in self.members}
        pkg_info = [t for t in tops if f"{t}/PKG-INFO" in self.members]
        if len(pkg_info) != 1:
            raise ValueError(f"{path}: expected one top folder with a PKG-INFO file, found {sorted(tops)}.")
        self.top = pkg_info[0]

    def read(self, member: str) -> bytes:
        name = posixpath.join(self.top, member)
        info = self.members.get(name)
        if info is None or not info.isfile():
            raise FileNotFoundError(f"{self.path}: member {name} is missing or not a regular file.")
        handle = self.tar.extractfile(info)
        if handle is None:
            raise ValueError(f"{self.path}: cannot read member {name}.")
        return handle.read()

    def list_folder(self, folder: str) -> list[str]:
        """Names of the regular files directly inside ``folder`` (no recursion), sorted."""
        prefix = posixpath.join(self.top, folder.rstrip("/")) + "/"
        names = sorted(
            n[len(prefix) :]
            for n, m in self.members.items()
            if n.startswith(prefix) and m.isfile() and "/" not in n[len(prefix) :]
        )
        if not names:
            raise FileNotFoundError(f"{self.path}: folder {prefix} is missing or empty.")
        return names

    def metadata(self) -> dict[str, str]:
        fields: dict[str, str] = {}
        for line in self.read("PKG-INFO").decode("utf-8").splitlines():
            if not line.strip():
                break  # the description body follows the header block
            key, sep, value = line.partition(":")
            if sep and not line.startswith(" "):
                fields.setdefault(key.strip(), value.strip())
        return fields

    def close(self) -> None:
        self.tar.close()


def _classes_present(label_path: str) -> list[int]:
    try:
        data = np.asanyarray(nib.load(label_path).dataobj)
    except Exception as e:
        raise ValueError(f"cannot read label file {label_path}: {e}") from e
    return [int(v) for v in np.unique(data) if v != 0]


def _notice_text(
    sdist_name: str, members: dict[str, str], copied_dicom: Sequence[str], task: str = "total", dataset: str = "ct"
) -> str:
    lines = [
        "monai-proto demo data",
        "=====================",
        "",
        f"These files are copied from the {PACKAGE_NAME} {PACKAGE_VERSION} source distribution on PyPI",
        f"({sdist_name}, {PYPI_URL}; project {PACKAGE_URL}),",
        "folder tests/reference_files/. They are distributed under the Apache License, Version 2.0;",
        "the licence text of that package is included as LICENSE.TotalSegmentator.",
        "",
        f"The label files are TotalSegmentator's own automatic predictions (class map '{task}' of",
        "totalsegmentator/map_to_binary.py, stored in labels.json); they are NOT manual annotations",
        "and must not be treated as a ground truth of clinical quality.",
        "",
        "Changes made: files renamed only; their bytes are unchanged (sha256 in provenance.json).",
        "labels.json, dataset.json, provenance.json and this NOTICE were added by monai-proto.",
        "",
        "Source member -> file in this folder:",
    ]
    for member, target in members.items():
        if member.endswith("/"):
            lines.append(f"  {member}* ({len(copied_dicom)} files) -> {target}* (original names)")
        else:
            lines.append(f"  {member} -> {target}")
    lines += [
        "",
        "Rebuild and verify with:",
        f"  python -m monai_proto.apps.prepare_demo_data --output DIR{' --dataset mri' if dataset == 'mri' else ''} "
        f"[--sdist {sdist_name}]",
        "",
        f"Reference: {REFERENCE}",
        "",
    ]
    return "\n".join(lines)


def slab_region(image_path: str, start: int, stop: int, axis: int = 2) -> dict:
    """The world-coordinate region (RAS mm along ``axis``) covered by voxel slices ``[start, stop)`` of the
    RAS-oriented image, half a voxel beyond the outer slice centres: the ``holdout`` entry of a data item."""
    image = nib.as_closest_canonical(nib.load(image_path))
    row = image.affine[axis]
    step = float(np.linalg.norm(image.affine[:3, axis]))
    centre = [float(row[axis] * k + row[3]) for k in (start, stop - 1)]
    lo, hi = min(centre) - step / 2, max(centre) + step / 2
    return {"axis": axis, "range_mm": [round(lo, 3), round(hi, 3)], "slices": [start, stop]}


def _dataset_description(dataset: str) -> dict:
    if dataset == "ct":
        return {
            "source_files": SOURCE_FILES,
            "scans": SCANS,
            "task": "total",
            "slab": ("scanA", A_SLAB_SLICES),
            "test": [dict(SCANS["scanB"])],
            "name": "TotalSegmentatorDemo",
            "modality": "CT",
            "description": (
                f"Two CT scans from the {PACKAGE_NAME} {PACKAGE_VERSION} source distribution "
                "(tests/reference_files): scanA abdomen-pelvis, non-contrast, 3 mm NIfTI; scanB upper-abdomen "
                "slab, contrast-enhanced, 20 DICOM slices. Labels are TotalSegmentator's automatic "
                "predictions ('total' class map), not manual annotations. Scan A trains outside its 'holdout' slab "
                "(slices 90-101 of its RAS grid) and is validated inside it; scan B is the test scan."
            ),
        }
    if dataset == "mri":
        return {
            "source_files": MRI_SOURCE_FILES,
            "scans": MRI_SCANS,
            "task": "total_mr",
            "slab": ("mri", MRI_SLAB_SLICES),
            "test": None,  # the same scan with its held-out slab: there is no second MRI
            "name": "TotalSegmentatorDemoMRI",
            "modality": "MR",
            "description": (
                f"One abdominal MRI from the {PACKAGE_NAME} {PACKAGE_VERSION} source distribution "
                "(tests/reference_files/example_mr_sm.nii.gz, 117 x 91 x 20 voxels of 3 mm). Labels are "
                "TotalSegmentator's automatic predictions ('total_mr' class map, numbered unlike CT), not manual "
                "annotations. The scan trains outside its 'holdout' slab (slices 10-13 of its RAS grid) and is "
                "validated inside it; the test list is the same scan (there is no second MRI), so only the slab "
                "measures generalisation."
            ),
        }
    raise ValueError(f"dataset {dataset!r} is not one of 'ct', 'mri'.")


def prepare_demo_data(
    output_dir: str, sdist_path: str | None = None, overwrite: bool = False, dataset: str = "ct"
) -> dict:
    """
    Build a demo data set from the TotalSegmentator source distribution.

    Args:
        output_dir: folder to write; created if needed.
        sdist_path: path of ``totalsegmentator-2.18.0.tar.gz``; downloaded with pip when None.
        overwrite: replace this tool's files in a non-empty ``output_dir``. Defaults to False.
        dataset: ``"ct"`` (scans A and B, ``monai_proto/data/demo``) or ``"mri"`` (``monai_proto/data/demo_mri``).

    Returns:
        The content written to ``provenance.json``.

    Raises:
        FileExistsError: ``output_dir`` is not empty and ``overwrite`` is False.
        FileNotFoundError: the source distribution or one of its expected members is missing.
        ValueError: the source distribution is not the expected package version or a label is unreadable.
    """
    spec = _dataset_description(dataset)
    output_dir = os.path.abspath(output_dir)
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        if not overwrite:
            raise FileExistsError(f"output folder {output_dir} is not empty; pass --overwrite to replace it.")
        for entry in _OUTPUT_ENTRIES:
            path = os.path.join(output_dir, entry)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(output_dir, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        if sdist_path is None:
            sdist_path = download_sdist(tmp)
        sdist = _Sdist(sdist_path)
        try:
            meta = sdist.metadata()
            if meta.get("Version") != PACKAGE_VERSION or meta.get("Name", "").lower() != PACKAGE_NAME.lower():
                raise ValueError(
                    f"{sdist_path}: expected {PACKAGE_NAME} {PACKAGE_VERSION} but PKG-INFO says "
                    f"{meta.get('Name')} {meta.get('Version')}."
                )
            class_map = read_total_class_map(
                sdist.read(CLASS_MAP_MEMBER).decode("utf-8"), CLASS_MAP_MEMBER, task=spec["task"]
            )

            files: dict[str, dict[str, str]] = {}
            copied_dicom: list[str] = []

            def copy(member: str, target: str) -> None:
                data = sdist.read(member)
                path = os.path.join(output_dir, *target.split("/"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
                files[target] = {"source": f"{sdist.top}/{member}", "sha256": _sha256_bytes(data)}

            for member, target in spec["source_files"].items():
                if member.endswith("/"):
                    copied_dicom = sdist.list_folder(member)
                    for name in copied_dicom:
                        copy(member + name, target + name)
                else:
                    copy(member, target)
            sdist_sha256 = _sha256_file(sdist_path)
            sdist_name = os.path.basename(sdist_path)
        finally:
            sdist.close()

    label_table = {"0": "background", **{str(k): v for k, v in class_map.items()}}
    scans = spec["scans"]
    present = {scan: _classes_present(os.path.join(output_dir, paths["label"])) for scan, paths in scans.items()}
    labels_json = {
        "source": f"{PACKAGE_NAME} {PACKAGE_VERSION}, {CLASS_MAP_MEMBER}, class_map['{spec['task']}']",
        "labels": label_table,
        "present": {scan: ids for scan, ids in present.items()},
        "files": {scan: paths for scan, paths in scans.items()},
    }
    _write_json(os.path.join(output_dir, "labels.json"), labels_json)

    # the training scan trains outside its held-out slab and is validated inside it
    slab_scan, slab_slices = spec["slab"]
    holdout = slab_region(os.path.join(output_dir, scans[slab_scan]["image"]), *slab_slices)
    train_scan = dict(scans[slab_scan], holdout=holdout)
    test = spec["test"] if spec["test"] is not None else [dict(train_scan)]
    dataset_json = {
        "name": spec["name"],
        "description": spec["description"],
        "reference": REFERENCE,
        "licence": "Apache-2.0 (see LICENSE.TotalSegmentator and NOTICE)",
        "release": f"{PACKAGE_NAME} {PACKAGE_VERSION}",
        "tensorImageSize": "3D",
        "modality": {"0": spec["modality"]},
        "labels": label_table,
        "numTraining": 1,
        "numTest": len(test),
        "training": [dict(train_scan)],
        "validation": [dict(train_scan)],
        "test": test,
    }
    _write_json(os.path.join(output_dir, "dataset.json"), dataset_json)

    with open(os.path.join(output_dir, "NOTICE"), "w", encoding="utf-8", newline="\n") as f:
        f.write(_notice_text(sdist_name, spec["source_files"], copied_dicom, spec["task"], dataset))

    provenance = {
        "package": PACKAGE_NAME,
        "version": PACKAGE_VERSION,
        "sdist": {"filename": sdist_name, "sha256": sdist_sha256, "url": PYPI_URL},
        "license": "Apache-2.0",
        "changes": "renamed only; bytes unchanged",
        "files": dict(sorted(files.items())),
    }
    _write_json(os.path.join(output_dir, "provenance.json"), provenance)
    return provenance


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monai_proto.apps.prepare_demo_data",
        description=f"Rebuild the monai-proto demo data from the {PACKAGE_NAME} {PACKAGE_VERSION} source distribution.",
    )
    parser.add_argument("--output", required=True, help="output folder (e.g. monai_proto/data/demo)")
    parser.add_argument(
        "--sdist", default=None, help=f"path of totalsegmentator-{PACKAGE_VERSION}.tar.gz (default: pip download)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace this tool's files in a non-empty --output")
    parser.add_argument(
        "--dataset",
        choices=("ct", "mri"),
        default="ct",
        help="ct: monai_proto/data/demo; mri: monai_proto/data/demo_mri",
    )
    args = parser.parse_args(argv)
    provenance = prepare_demo_data(args.output, args.sdist, overwrite=args.overwrite, dataset=args.dataset)
    total = sum(os.path.getsize(os.path.join(args.output, *p.split("/"))) for p in provenance["files"])
    print(f"wrote {len(provenance['files'])} source files ({total / 1e6:.2f} MB) and metadata to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
