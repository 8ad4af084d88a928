"""Models prunekit builds by name: CIFAR ResNets, VGGs, MobileNetV2, LeNet-5, the digits CNN,
and any torchvision ("tv:<name>") or timm ("timm:<name>") model when those packages import.

>>> sorted(list_models())[:3]
['lenet5', 'mobilenetv2_cifar', 'resnet110']
"""
from . import mobilenetv2_cifar, resnet_cifar, small, vgg_cifar  # noqa: F401  (they register their models)
from .registry import MODELS, ModelSpec, create_model, get_model_spec, list_models

__all__ = ["MODELS", "ModelSpec", "create_model", "get_model_spec", "list_models"]
