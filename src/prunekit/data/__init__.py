"""Datasets and loaders: `load_data(DataConfig(name=...))` gives train/val/test batches.

Registered: "digits" (scikit-learn, bundled), "cifar10"/"cifar100" (official python batches,
MD5-checked), "imagefolder" (<split>/<class>/<image> folder or archive, decoded and cached).

>>> bundle = load_data(DataConfig(name="digits"))
>>> bundle.input_shape, bundle.num_classes
((1, 8, 8), 10)
"""
from . import cifar, digits, imagefolder  # noqa: F401  (they register their datasets)
from .config import DataConfig
from .errors import DataError
from .registry import DATASETS, DataBundle, DatasetSpec, load_data

__all__ = ["DATASETS", "DataBundle", "DataConfig", "DataError", "DatasetSpec", "load_data"]
