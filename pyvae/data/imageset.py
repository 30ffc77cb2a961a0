"""The images of one split of a data set, with their labels, as every loader returns them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyvae.data.streaming import StreamedImages


@dataclass
class ImageSet(torch.utils.data.Dataset):
    """Images as a float tensor (N, x_dim) in [0, 1], with labels when the source has them; a set
    too large to hold in memory has a :class:`~pyvae.data.streaming.StreamedImages` standing for
    that tensor.

    With ``dynamic=True`` the images are grayscale probabilities and every read is a
    fresh Bernoulli draw (:meth:`draw` for the whole set at once).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    image_shape: tuple[int, int, int]
    name: str
    split: str
    dynamic: bool = False

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        x = self.images[i]
        return torch.bernoulli(x) if self.dynamic else x

    @property
    def x_dim(self) -> int:
        return self.images.shape[1]

    def draw(self) -> torch.Tensor:
        """All images: a fresh binarization if dynamic, the stored tensor otherwise."""
        if self.dynamic and isinstance(self.images, StreamedImages):
            return self.images.binarized(int(torch.randint(2**31, ())))
        return torch.bernoulli(self.images) if self.dynamic else self.images

    def is_binary(self) -> bool:
        """Whether every value is 0 or 1 (of a streamed set: of 256 images spread over it)."""
        x = spread(self.images, 256) if isinstance(self.images, StreamedImages) else self.images
        return self.dynamic or bool(((x == 0) | (x == 1)).all())


def spread(x: torch.Tensor, n: int | None) -> torch.Tensor:
    """``n`` rows evenly spaced over ``x`` (all of it when n is None, 0 or >= len(x)).

    Static binarized MNIST's test split is sorted by class: its first rows are all zeros. A streamed
    set's rows are read (:class:`~pyvae.streaming.StreamedImages`).
    """
    if isinstance(x, StreamedImages):
        return x[spread(torch.arange(len(x)), n)]
    if not n or n >= x.shape[0]:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, n).long()]
