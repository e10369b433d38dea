# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""MONAI Label tasks for monai-proto bundles, built on MONAI Label's bundle tasks.

- :class:`ProtoBundleInferTask`: MONAI Label's ``BundleInferTask`` with the string paths MONAI Label adds to the
  data (``image_path``) kept away from the bundle's pre-transforms (MONAI 1.6's ``Spacingd`` updates every
  ``image_*`` entry and fails on a string).
- :class:`ProtoBundleTrainTask`: ``BundleTrainTask`` writing the datastore's lists to the bundle's own keys
  (``train#datalist``, or ``train#datalists`` = [labelled, unlabelled] for a semi-supervised bundle), with the
  labels numbered as the model numbers them, and validation switched off when there is no validation split.
- :class:`FewShotInferTask`: segments a new structure from an example: the support is a study of the datastore
  with a saved label (image id, label tag and class value in the request's options; default: the most recently
  labelled study); support prototypes are cached per (study, label, class).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from monai.bundle import ConfigParser
from monai.inferers import Inferer
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask

logger = logging.getLogger(__name__)

__all__ = [
    "StashStringKeysd",
    "RestoreStashedKeysd",
    "ProtoBundleInferTask",
    "ProtoBundleTrainTask",
    "FewShotInferTask",
]

_STASH = "monai_proto_stash"


class StashStringKeysd:
    """Move the string values of ``prefix*`` keys (MONAI Label's ``image_path``) aside, under one stash key.

    MONAI 1.6's ``Spacingd`` updates every ``image_*`` entry of a dictionary as image metadata and raises
    ``'str' object has no attribute 'update'`` on MONAI Label's ``image_path``. :class:`RestoreStashedKeysd`
    puts them back after the bundle's pre-transforms.
    """

    def __init__(self, prefix: str = "image_") -> None:
        self.prefix = prefix

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        stash = {
            k: d.pop(k) for k in list(d) if isinstance(k, str) and k.startswith(self.prefix) and isinstance(d[k], str)
        }
        d[_STASH] = stash
        return d


class RestoreStashedKeysd:
    """Put back what :class:`StashStringKeysd` moved aside."""

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        d.update(d.pop(_STASH, {}))
        return d


def _missing_model_message(path: str) -> str:
    return (
        f"{os.path.join(path, 'models', 'model.pt')} does not exist: train the bundle first "
        f"(python -m monai.bundle run training --config_file {os.path.join(path, 'configs', 'train.json')}), "
        "or from this server's training task, then restart the server."
    )


class ProtoBundleInferTask(BundleInferTask):
    """MONAI Label's ``BundleInferTask`` for a monai-proto bundle (see the module's docstring)."""

    def __init__(self, path: str, conf: dict[str, str], **kwargs: Any) -> None:
        super().__init__(path, conf, **kwargs)
        if not self.is_valid():
            logger.warning(f"Not serving {os.path.basename(path)}: {_missing_model_message(path)}")

    def pre_transforms(self, data: dict | None = None) -> Sequence[Callable]:
        return [StashStringKeysd(), *super().pre_transforms(data), RestoreStashedKeysd()]


class ProtoBundleTrainTask(BundleTrainTask):
    """MONAI Label's ``BundleTrainTask`` for a monai-proto bundle (see the module's docstring).

    Request options beyond MONAI Label's: ``iterations_per_epoch``. ``val_split`` 0 trains without validation
    (``models/model.pt`` is then the final model); a negative ``val_split`` keeps the bundle's own validation.
    """

    def __init__(self, path: str, conf: dict[str, str], **kwargs: Any) -> None:
        super().__init__(path, conf, **kwargs)
        self._request: dict = {}
        self._datastore: Datastore | None = None

    def config(self) -> dict[str, Any]:
        options = super().config()
        options["max_epochs"] = int(self.bundle_config.get("epochs", options["max_epochs"]))
        options["iterations_per_epoch"] = int(self.bundle_config.get("iterations_per_epoch", 20))
        return options

    def __call__(self, request: dict, datastore: Datastore):
        self._request, self._datastore = dict(request), datastore
        try:
            return super().__call__(request, datastore)
        finally:
            self._request, self._datastore = {}, None

    def _update_overrides(self, overrides: dict) -> dict:
        train = overrides.pop(self.const.key_train_dataset_data())
        validation = overrides.pop(self.const.key_validate_dataset_data(), None)
        epochs = int(overrides[self.const.key_train_trainer_max_epochs()])
        overrides["epochs"] = epochs
        if "iterations_per_epoch" in self._request:
            overrides["iterations_per_epoch"] = int(self._request["iterations_per_epoch"])
        if "datalists" in self.bundle_config["train"]:  # semi-supervised: [labelled, unlabelled]
            overrides["train#datalists"] = [train, self._unlabelled()]
        else:
            overrides["train#datalist"] = train
        # labels drawn in Slicer carry the model's own numbers (1..K), not the source data set's ids
        organs = ConfigParser(copy.deepcopy(self.bundle_config.config)).get_parsed_content("organs")
        overrides["label_ids"] = list(range(1, len(organs) + 1))
        if validation:
            overrides["validate#datalist"] = validation
        elif validation is not None:  # no validation split: train only; PublishModelHandler publishes the final model
            overrides["val_interval"] = epochs + 1
            overrides["run"] = ["$@train#trainer.run()"]
        logger.info(
            f"training {os.path.basename(self.bundle_path)}: {len(train)} labelled studies, overrides "
            f"{sorted(overrides)}"
        )
        return overrides

    def _unlabelled(self) -> list[dict]:
        if self._datastore is None:
            return []
        return [{"image": self._datastore.get_image_uri(i)} for i in self._datastore.get_unlabeled_images()]


class FewShotInferTask(ProtoBundleInferTask):
    """Segment a new structure in the current volume from an example, with no retraining.

    Options (shown by Slicer's MONAI Label plugin): ``support_image`` (image id of a study with a saved label;
    default: the most recently labelled study), ``support_tag`` (label tag, default ``final``),
    ``support_value`` (class value in that label, default 1), ``label_name`` (name of the output structure).

    Args:
        path: the bundle folder.
        conf: the app's config.
        datastore: the app's datastore, where supports are looked up.
    """

    def __init__(self, path: str, conf: dict[str, str], datastore: Datastore, **kwargs: Any) -> None:
        super().__init__(path, conf, **kwargs)
        self.datastore = datastore
        self._inferers: dict[tuple, Inferer] = {}  # the inferer caches its support's prototypes
        self.max_cached = 8
        if self.is_valid():
            self._config.update({"support_image": "", "support_tag": "final", "support_value": 1, "label_name": ""})

    def _support(self, data: dict) -> tuple[str, str, int]:
        tag = str(data.get("support_tag") or "final")
        image_id = str(data.get("support_image") or "")
        if not image_id:
            labelled = self.datastore.get_labeled_images(tag)
            if not labelled:
                raise ValueError(f"no study has a saved label with tag {tag!r}: save a label of the example first.")
            image_id = max(labelled, key=lambda i: os.path.getmtime(self.datastore.get_label_uri(i, tag)))
        label = self.datastore.get_label_uri(image_id, tag)
        if not label or not os.path.exists(label):
            raise ValueError(f"study {image_id!r} has no label with tag {tag!r}.")
        return image_id, label, int(data.get("support_value") or 1)

    def _prepare_support(self, data: dict) -> tuple:
        """Build (or find in the cache) the inferer of the request's support; returns its cache key.

        The bundle config is re-parsed here, before the pre-transforms are made, so that the pre-transforms and the
        post-transforms come from one parse.
        """
        image_id, label, value = self._support(data)
        key = (image_id, label, os.path.getmtime(label), value, str(data.get("device")))
        if key not in self._inferers:
            self._update_device(data)
            self.bundle_config["support_image"] = self.datastore.get_image_uri(image_id)
            self.bundle_config["support_label"] = label
            self.bundle_config["support_class_id"] = value
            self.bundle_config["support_class"] = str(data.get("label_name") or f"class {value}")
            self.bundle_config.parse()
            logger.info(f"few-shot support: study {image_id}, label {label}, value {value}")
            if len(self._inferers) >= self.max_cached:
                self._inferers.pop(next(iter(self._inferers)))  # the oldest support
            self._inferers[key] = self.bundle_config.get_parsed_content("inferer", instantiate=True)
        return key

    def pre_transforms(self, data: dict | None = None) -> Sequence[Callable]:
        self._prepare_support(data or {})
        return super().pre_transforms(data)

    def inferer(self, data: dict | None = None) -> Inferer:
        return self._inferers[self._prepare_support(data or {})]

    def __call__(self, request: dict, callbacks=None):
        result_file, result = super().__call__(request, callbacks)
        name = str(request.get("label_name") or f"class {request.get('support_value') or 1}")
        result["label_names"] = {name: 1}
        return result_file, result
