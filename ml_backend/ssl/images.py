"""``uint8 (N, H, W)`` (greyscale) or ``(N, H, W, 3)`` (colour) image arrays as a torch
``Dataset``, and the ``DataLoader`` every step uses.

``workers`` (DataLoader worker processes) is an explicit argument: the pure core reads no
environment; the caller (the Django adapter, a bench script) decides.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class ImageArray(Dataset):
    """uint8 ``(N, H, W)`` → float ``(1, H, W)``, or ``(N, H, W, 3)`` → ``(3, H, W)``, in
    [0, 1], through ``transform``.

    With ``targets`` an item is ``(x, target)``; with ``flip_mask`` the images whose entry is
    true are flipped left-right with probability 0.5 before ``transform``.
    """

    def __init__(self, images: np.ndarray, transform, targets: np.ndarray | None = None,
                 flip_mask: np.ndarray | None = None):
        if images.dtype != np.uint8 or not (
                images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise ValueError("images must be a uint8 array of shape (N, H, W) or (N, H, W, 3)")
        self.colour = images.ndim == 4
        if flip_mask is not None and len(flip_mask) != len(images):
            raise ValueError("flip_mask needs one entry per image")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.transform = transform
        self.targets = None if targets is None else torch.as_tensor(targets)
        self.flip_mask = None if flip_mask is None else np.asarray(flip_mask, dtype=bool)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        x = self.images[index]
        x = (x.permute(2, 0, 1) if self.colour else x.unsqueeze(0)).float().div_(255.0)
        if self.flip_mask is not None and self.flip_mask[index] and torch.rand(1).item() < 0.5:
            x = x.flip(-1)   # only where the scan's dataset says flips preserve anatomy
        x = self.transform(x)
        if self.targets is None:
            return x
        return x, self.targets[index]


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool,
                generator: torch.Generator | None, sampler=None, drop_last: bool = False,
                device: torch.device | None = None, workers: int = 0) -> DataLoader:
    """A DataLoader with ``workers`` worker processes (0: load in the calling process);
    memory is pinned when batches go to a GPU."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, generator=generator, drop_last=drop_last,
                      num_workers=workers, pin_memory=device is not None and device.type == "cuda",
                      persistent_workers=workers > 0)
