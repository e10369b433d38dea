# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""
Few-shot episodes drawn from multi-class label maps, on MONAI datasets and transforms.

An episode of class ``c`` is a support image with the binary mask of ``c`` and a query image with the
binary mask of ``c`` (1-way). The classes are split into training classes (episodes during training) and
test classes (episodes at evaluation only), under the two protocols of the few-shot medical segmentation
literature (SSL-ALPNet, Ouyang et al. ECCV 2020; ADNet; Q-Net):

- setting 1: test classes may appear in training patches, unlabelled (they are background of the
  training episodes' binary masks);
- setting 2: a training patch that contains any voxel of a test class is rejected, so the network never
  sees a test class during training.

Used for IPLSL (Chen Jie, Du Xiuquan et al., Artificial Intelligence in Medicine 2025,
doi 10.1016/j.artmed.2025.103183) and its PANet-style baseline.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Randomizable, SpatialPad
from torch.utils.data import Dataset

__all__ = ["FewShotEpisodeDataset", "build_volume_episodes", "check_class_split"]


def check_class_split(train_classes: Sequence[int], test_classes: Sequence[int]) -> tuple[list[int], list[int]]:
    """
    Validate a split of class ids into training and test classes.

    Raises:
        ValueError: when a list is empty (training classes only), holds 0 (background) or the two overlap.
    """
    train, test = [int(c) for c in train_classes], [int(c) for c in test_classes]
    if not train:
        raise ValueError("train_classes must contain at least one class id, but got an empty sequence.")
    if any(c <= 0 for c in train + test):
        raise ValueError(f"class ids must be positive (0 is background), but got train {train}, test {test}.")
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise ValueError(f"train and test classes must be disjoint, but both contain {overlap}.")
    return train, test


def build_volume_episodes(
    support_items: Sequence[Mapping[str, str]],
    query_items: Sequence[Mapping[str, str]],
    class_ids: Sequence[int],
    class_names: Sequence[str] | None = None,
    skip_same: bool = True,
) -> list[dict]:
    """
    Whole-volume 1-shot episodes for evaluation: every (support item, query item, class) combination.

    Args:
        support_items: datalist items ``{"image": ..., "label": ...}`` that provide the support.
        query_items: datalist items that are segmented.
        class_ids: the (test) class ids.
        class_names: names of ``class_ids`` for the ``episode`` tag; the ids when None.
        skip_same: leave out pairs whose support and query image are the same file. Defaults to True. Set it
            False where the support and the query are disjoint regions of one scan (items with a ``"holdout"``
            region: the query's region is copied to ``"holdout"``, the support's to ``"support_holdout"``, for
            :class:`~monai_proto.transforms.HoldOutRegiond` with ``keep="inside"`` on the query label and
            ``keep="outside"`` on the support label).

    Returns:
        items ``{"support_image", "support_label", "image", "label", "class_id", "episode"}`` (and the held-out
        regions, when the items have them), for a transform
        chain ending with :class:`~monai_proto.transforms.BinarizeClassd` on ``["support_label", "label"]``.

    Raises:
        ValueError: when no episode results or the names do not match the ids.
    """
    names = [str(c) for c in class_ids] if class_names is None else list(class_names)
    if len(names) != len(class_ids):
        raise ValueError(f"class_names must match class_ids, but got {names} for {list(class_ids)}.")
    episodes = []
    for (class_id, name), support, query in itertools.product(zip(class_ids, names), support_items, query_items):
        if skip_same and support["image"] == query["image"]:
            continue
        episodes.append(
            {
                "support_image": support["image"],
                "support_label": support["label"],
                "image": query["image"],
                "label": query["label"],
                "class_id": int(class_id),
                "episode": f"{name}",
            }
        )
        if query.get("holdout"):
            episodes[-1]["holdout"] = query["holdout"]
        if support.get("holdout"):
            episodes[-1]["support_holdout"] = support["holdout"]
    if not episodes:
        raise ValueError("no episode: every support item is also the query item; pass different items.")
    return episodes


class FewShotEpisodeDataset(Dataset, Randomizable):
    """
    Random 1-way 1-shot training episodes cropped from preprocessed multi-class volumes.

    Each item: draw a training class ``c`` present in the volumes, a support volume and a query volume
    containing ``c`` (the same volume is allowed, with independently drawn patches, so one labelled scan is
    enough), and in each a patch of ``patch_size`` centred on a random voxel of ``c`` (shifted by up to
    ``jitter`` of the patch size, clamped to the volume, padded when the volume is smaller: the image by
    replication, the label with ``ignore_value``). With probability ``empty_query_prob`` the query patch is
    instead drawn where ``c`` is absent, so the network learns to answer "no organ here" (at inference most of a
    volume holds no voxel of the class). In setting 2 a patch containing a test class, or a voxel whose label is
    hidden (``ignore_value``: it could be a test class), is rejected and redrawn (up to ``max_tries`` per
    episode). The labels are then binarised (``c`` -> 1, ``ignore_value`` kept, all else 0) and
    ``patch_transform`` (e.g. intensity augmentation; keys ``"image"``, ``"label"``) is applied to support and
    query independently, then ``query_transform`` to the query alone (e.g.
    :class:`~monai_proto.transforms.RandThinSlabd` and ``DivisiblePadd``, so that some queries are thin slabs padded
    as the inferer pads a thin volume).

    Args:
        volumes: preprocessed items ``{image_key: (C, *S), label_key: (1, *S)}`` with class ids, e.g. a MONAI
            ``CacheDataset`` of the deterministic transforms.
        train_classes: class ids used for training episodes.
        test_classes: held-out class ids (never the episode class; excluded from patches in setting 2).
        patch_size: spatial size of the patches.
        num_episodes: length of the dataset (episodes per epoch).
        setting: 1 or 2 (see the module docstring). Defaults to 1.
        jitter: largest shift of the patch centre from the drawn voxel, as a fraction of the patch size.
            Defaults to 0.25.
        patch_transform: dictionary transform applied to each patch. Defaults to None.
        query_transform: dictionary transform applied to the query patch after ``patch_transform`` (it may change
            the query's spatial size). A query drawn to hold the class is transformed again (up to ``max_tries``
            times, then left untransformed) while the result has fewer than ``min_foreground`` voxels of it, so a
            thinning transform never turns a positive query into an empty one. Seeded with ``seed + 1``.
            Defaults to None.
        max_tries: patch draws per episode in setting 2 before giving up. Defaults to 50.
        min_foreground: smallest number of class voxels in each patch. Defaults to 1.
        empty_query_prob: probability of a query patch without the class. Defaults to 0.25.
        ignore_value: label value of hidden voxels (never a class, skipped by the losses). Defaults to 255.
        image_key: image key of ``volumes``. Defaults to ``"image"``.
        label_key: label key of ``volumes``. Defaults to ``"label"``.
        seed: seed of the episode draws. Defaults to 0.

    Items: ``{"support_image": (C, *P), "support_label": (1, *P), "image": (C, *Q), "label": (1, *Q),
    "class_id": int}`` with binary labels; ``image``/``label`` are the query (``Q`` is ``P`` unless
    ``query_transform`` changes the size).

    Raises:
        ValueError: invalid split (:func:`check_class_split`), ``setting`` not 1 or 2, no training class present
            in the volumes, or invalid sizes.
        RuntimeError: (in ``__getitem__``) no valid patch within ``max_tries`` draws in setting 2.
    """

    def __init__(
        self,
        volumes: Sequence[Mapping[str, torch.Tensor]],
        train_classes: Sequence[int],
        test_classes: Sequence[int],
        patch_size: Sequence[int],
        num_episodes: int,
        setting: int = 1,
        jitter: float = 0.25,
        patch_transform: Callable | None = None,
        query_transform: Callable | None = None,
        max_tries: int = 50,
        min_foreground: int = 1,
        empty_query_prob: float = 0.25,
        ignore_value: int = 255,
        image_key: str = "image",
        label_key: str = "label",
        seed: int = 0,
    ) -> None:
        self.train_classes, self.test_classes = check_class_split(train_classes, test_classes)
        if setting not in (1, 2):
            raise ValueError(f"setting must be 1 or 2, but got {setting}.")
        if num_episodes < 1:
            raise ValueError(f"num_episodes must be positive, but got {num_episodes}.")
        if not 0.0 <= jitter <= 0.5:
            raise ValueError(f"jitter must be in [0, 0.5], but got {jitter}.")
        if max_tries < 1 or min_foreground < 1:
            raise ValueError(f"max_tries and min_foreground must be positive, but got {max_tries}, {min_foreground}.")
        if len(volumes) == 0:
            raise ValueError("volumes must not be empty.")
        self.volumes = volumes
        self.patch_size = tuple(int(s) for s in patch_size)
        if any(s < 1 for s in self.patch_size):
            raise ValueError(f"patch_size must be positive, but got {list(patch_size)}.")
        self.num_episodes = int(num_episodes)
        self.setting = setting
        self.jitter = float(jitter)
        self.patch_transform = patch_transform
        self.query_transform = query_transform
        self.max_tries = int(max_tries)
        self.min_foreground = int(min_foreground)
        if not 0.0 <= empty_query_prob < 1.0:
            raise ValueError(f"empty_query_prob must be in [0, 1), but got {empty_query_prob}.")
        self.empty_query_prob = float(empty_query_prob)
        self.ignore_value = int(ignore_value)
        self.image_key, self.label_key = image_key, label_key
        self.seed = int(seed)
        self._calls = 0
        self._pad_image = SpatialPad(self.patch_size, mode="replicate")
        self._pad_label = SpatialPad(self.patch_size, mode="constant", value=self.ignore_value)
        self._index: list[dict[int, torch.Tensor]] | None = None
        self.set_random_state(seed)
        for offset, transform in enumerate((patch_transform, query_transform)):  # two streams, not one
            if transform is not None and hasattr(transform, "set_random_state"):
                transform.set_random_state(seed + offset)

    def __len__(self) -> int:
        return self.num_episodes

    def class_voxels(self) -> list[dict[int, torch.Tensor]]:
        """Per volume: flat voxel indices of every training class it contains (computed once)."""
        if self._index is None:
            index = []
            for item in self.volumes:
                flat = torch.as_tensor(item[self.label_key]).reshape(-1).round().long()
                per_class = {}
                for c in self.train_classes:
                    where = torch.nonzero(flat == c).squeeze(1)
                    if where.numel() >= self.min_foreground:
                        per_class[c] = where
                index.append(per_class)
            if not any(index):
                raise ValueError(
                    f"none of the training classes {self.train_classes} occurs in the {len(self.volumes)} volume(s)."
                )
            self._index = index
        return self._index

    def _crop(self, item: Mapping[str, torch.Tensor], flat_index: int, rng: np.random.Generator) -> tuple:
        image, label = torch.as_tensor(item[self.image_key]), torch.as_tensor(item[self.label_key])
        shape = label.shape[1:]
        centre = np.unravel_index(int(flat_index), tuple(shape))
        slices = []
        for c, size, dim in zip(centre, self.patch_size, shape):
            shift = int(rng.integers(-int(self.jitter * size), int(self.jitter * size) + 1)) if self.jitter else 0
            start = int(np.clip(c + shift - size // 2, 0, max(0, dim - size)))
            slices.append(slice(start, start + size))
        region = (slice(None), *slices)
        return self._pad_image(image[region]), self._pad_label(label[region])

    def _allowed(self, label: torch.Tensor) -> bool:
        """Setting 2: no test class and no hidden voxel (which could be one) in the patch."""
        if self.setting != 2:
            return True
        banned = torch.tensor([*self.test_classes, self.ignore_value])
        return not bool(torch.isin(label, banned).any())

    def _draw_patch(self, volume: int, class_id: int, rng: np.random.Generator) -> tuple | None:
        voxels = self.class_voxels()[volume][class_id]
        tries = self.max_tries if self.setting == 2 else 1
        for _ in range(tries):
            image, label = self._crop(self.volumes[volume], int(voxels[rng.integers(voxels.numel())]), rng)
            label = label.round()
            if int((label == class_id).sum()) >= self.min_foreground and self._allowed(label):
                return image, label
        return None

    def _draw_empty_patch(self, volume: int, class_id: int, rng: np.random.Generator) -> tuple | None:
        """A patch anywhere in the volume with no voxel of the class (and at most half of it hidden)."""
        item = self.volumes[volume]
        num_voxels = int(torch.as_tensor(item[self.label_key])[0].numel())
        for _ in range(self.max_tries):
            image, label = self._crop(item, int(rng.integers(num_voxels)), rng)
            label = label.round()
            hidden = float((label == self.ignore_value).float().mean())
            if not bool((label == class_id).any()) and hidden <= 0.5 and self._allowed(label):
                return image, label
        return None

    def _transform_query(self, patch: dict, keep_class: bool) -> dict:
        """``query_transform`` applied to ``patch``; for a query that holds the class, redrawn until it still does."""
        for _ in range(self.max_tries):
            out = self.query_transform(dict(patch))
            if not keep_class or int((out["label"] == 1).sum()) >= self.min_foreground:
                return out
        return patch

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, int(index), self._calls, int(self.R.randint(2**31))])
        self._calls += 1
        index_table = self.class_voxels()
        present = [c for c in self.train_classes if any(c in v for v in index_table)]
        for _ in range(self.max_tries):
            class_id = int(present[rng.integers(len(present))])
            holders = [i for i, v in enumerate(index_table) if class_id in v]
            support_volume, query_volume = (int(holders[rng.integers(len(holders))]) for _ in range(2))
            support = self._draw_patch(support_volume, class_id, rng)
            empty = bool(rng.random() < self.empty_query_prob)
            draw = self._draw_empty_patch if empty else self._draw_patch
            query = draw(query_volume, class_id, rng) if support is not None else None
            if support is not None and query is not None:
                break
        else:
            raise RuntimeError(
                f"no patch of size {list(self.patch_size)} free of the test classes {self.test_classes} found in "
                f"{self.max_tries} draws (setting {self.setting}); use smaller patches, other test classes "
                "or setting 1."
            )
        episode = {"class_id": class_id}
        for prefix, (image, label) in (("support_", support), ("", query)):
            binary = torch.where(label == self.ignore_value, float(self.ignore_value), (label == class_id).float())
            patch = {"image": image, "label": binary.to(image.dtype)}
            if self.patch_transform is not None:
                patch = self.patch_transform(patch)
            if prefix == "" and self.query_transform is not None:
                patch = self._transform_query(patch, keep_class=not empty)
            episode[f"{prefix}image"] = patch["image"]
            episode[f"{prefix}label"] = patch["label"]
        return episode
