"""Data: the built-in data sets and your own (files, folders, torchvision), binarization,
held-out splits, streaming from disk, and how a batch is served to a program.

* :mod:`pyvae.data.datasets`: the built-in sets, ``load_train_test``, binarization, splits.
* :mod:`pyvae.data.sources`: a folder of images, an ``.npz``/``.npy`` file, scikit-learn photos.
* :mod:`pyvae.data.streaming`: sets too large for memory, decoded by DataLoader workers.
* :mod:`pyvae.data.batching`: minibatches, labelled and unlabelled calls, the serving plan.
"""

from pyvae.data.datasets import (
    ImageSet,
    binarize,
    binarize_for,
    data_root,
    hold_out,
    load_dataset,
    load_train_test,
    semi_supervised,
    validation_split,
)

__all__ = [
    "ImageSet",
    "binarize",
    "binarize_for",
    "data_root",
    "hold_out",
    "load_dataset",
    "load_train_test",
    "semi_supervised",
    "validation_split",
]
