# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
from .backbones import BackboneFeatures, FeatureBackbone, SwinUNETRFeatureBackbone, UNetFeatureBackbone, build_backbone
from .dynamic_head import DynamicPrototypeHead
from .kmax_decoder import KMaXDecoder, KMaXPrediction, KMaXPredictor, KMaXTransformerBlock, semantic_confidence
from .prototype_bank import PrototypeBank
from .prototype_interaction import PrototypeInteractionBlock
