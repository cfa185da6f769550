"""The networks: frozen CLIP backbone, Stage-I phi-network, Stage-II composing adapters."""
from .adapters import (ADAPTER_KINDS, AdapterConfig, Bottleneck, BottleneckBlock, LoRADelta, adapter_state,
                       add_adapters, count_trainable, merge_adapters)
from .backbone import (PLACEHOLDER, Backbone, BackboneConfig, BackboneError, ImageFeatures, PromptError,
                       create_backbone, default_device, load_backbone, pool_patches, register_model_config,
                       resolve_patch_grid)
from .phi import PhiConfig, PhiNetwork

__all__ = [
    "ADAPTER_KINDS", "AdapterConfig", "Bottleneck", "BottleneckBlock", "LoRADelta", "adapter_state",
    "add_adapters", "count_trainable", "merge_adapters",
    "PLACEHOLDER", "Backbone", "BackboneConfig", "BackboneError", "ImageFeatures", "PromptError",
    "create_backbone", "default_device", "load_backbone", "pool_patches", "register_model_config",
    "resolve_patch_grid",
    "PhiConfig", "PhiNetwork",
]
