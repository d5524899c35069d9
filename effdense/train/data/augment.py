"""The paper's augmentation, batched on the device where the images already are (no CPU workers)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

class Augment:
    """The paper's augmentation, batched on the images' device: zero-pad ``pad`` pixels, take a random crop of
    the original size, flip horizontally with probability 1/2; then per-channel normalization.

    Random parameters come from a CPU :class:`torch.Generator` (:meth:`draw`), so a run augments identically
    on every device and every rank can draw the parameters of the whole global batch and apply its slice.
    """

    def __init__(self, mean, std, pad: int = 4, flip: bool = True) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self.pad, self.flip = pad, flip

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        """``[n, 3]`` int64: row offset, column offset (in ``[0, 2*pad]``), flip (0 or 1)."""
        params = torch.randint(0, 2 * self.pad + 1, (n, 3), generator=generator)
        params[:, 2] = torch.randint(0, 2, (n,), generator=generator) if self.flip else 0
        return params

    def normalize(self, images: Tensor) -> Tensor:
        """``uint8`` images to normalized float32."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float().div_(255) - mean).div_(std)

    def __call__(self, images: Tensor, params: Tensor | None = None) -> Tensor:
        """Augment ``uint8 [n, C, H, W]`` images with ``params`` from :meth:`draw` (None: only normalize)."""
        if params is None:
            return self.normalize(images)
        n, c, h, w = images.shape
        params = params.to(images.device)
        padded = F.pad(images, (self.pad,) * 4)
        rows = (params[:, 0:1] + torch.arange(h, device=images.device)).view(n, 1, h, 1)
        cols = (params[:, 1:2] + torch.arange(w, device=images.device)).view(n, 1, 1, w)
        flip = params[:, 2].view(n, 1, 1, 1).bool()
        cols = torch.where(flip, cols.flip(3), cols)
        idx = torch.arange(n, device=images.device).view(n, 1, 1, 1)
        chan = torch.arange(c, device=images.device).view(1, c, 1, 1)
        return self.normalize(padded[idx, chan, rows, cols])
