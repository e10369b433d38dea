# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The MONAI Label app (MONAI Label loads ``main.py`` of the app folder); see the package's docstring."""

from __future__ import annotations

import logging

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import strtobool

import monai_proto
from monai_proto.apps.monailabel import default_bundles_dir, find_bundles, is_few_shot_bundle
from monai_proto.apps.monailabel.tasks import FewShotInferTask, ProtoBundleInferTask, ProtoBundleTrainTask

logger = logging.getLogger(__name__)


class MonaiProtoApp(MONAILabelApp):
    """Serves every bundle of ``conf["bundles"]`` (default: the repository's ``bundles/``).

    Config (``--conf key value``): ``bundles`` (folder), ``models`` (comma-separated bundle names, default all),
    ``skip_trainers`` (``true`` to serve inference only), ``preload``.
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.bundles = find_bundles(conf.get("bundles") or default_bundles_dir(), conf.get("models"))
        logger.info(f"monai-proto bundles: {self.bundles}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="monai-proto",
            description="Prototype-learning segmentation bundles (IAPL, IPLSL few-shot, MPCL semi-supervised)",
            version=getattr(monai_proto, "__version__", "0"),
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, path in self.bundles.items():
            if is_few_shot_bundle(path):
                task: InferTask = FewShotInferTask(path, self.conf, datastore=self.datastore())
            else:
                task = ProtoBundleInferTask(path, self.conf)
            if task.is_valid():
                infers[name] = task
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers: dict[str, TrainTask] = {}
        if strtobool(self.conf.get("skip_trainers", "false")):
            return trainers
        for name, path in self.bundles.items():
            if is_few_shot_bundle(path):  # a few-shot bundle adapts to a new structure from an example, untrained
                continue
            task = ProtoBundleTrainTask(path, self.conf)
            if task.is_valid():
                trainers[name] = task
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}
