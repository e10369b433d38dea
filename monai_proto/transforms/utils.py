# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Helpers shared by the transforms: how a data item names its source in an error message."""

from __future__ import annotations

from collections.abc import Hashable

from monai.data import MetaTensor
from monai.utils import ImageMetaKey

__all__ = ["describe_source"]


def describe_source(data: object, key: Hashable | None = None) -> str:
    """
    The file an array was loaded from (``meta["filename_or_obj"]`` of a MetaTensor), for error messages;
    ``"<key 'image' (no file name)>"`` when the array carries no file name.
    """
    if isinstance(data, MetaTensor):
        name = data.meta.get(ImageMetaKey.FILENAME_OR_OBJ)
        if name:
            return str(name)
    return f"<key {key!r} (no file name)>" if key is not None else "<array (no file name)>"
