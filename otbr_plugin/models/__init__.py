"""Model zoo: ``create_model(name, ...)`` and ``list_models()``.

State-dict names follow the toolkits whose checkpoints we read: preactresnet18 matches BackdoorBench
(102 entries at any width), vgg19_bn and resnet18 match torchvision. Models take *normalized* input: the data
pipeline normalizes, as in BackdoorBench.
"""

from .registry import create_model, list_models, model_options, register_model, ModelConfig
from . import preact_resnet, resnet, vgg, small  # noqa: F401  (registers the models)

__all__ = ["create_model", "list_models", "model_options", "register_model", "ModelConfig"]
