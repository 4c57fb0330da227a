"""Regions of a picture on the grids a UNet works on: masks and boxes at any aspect ratio.

- ``center_crop_to_aspect``: cut a mask to another aspect ratio exactly as ComfyUI's
  ``common_upscale(..., crop="center")`` cuts hint images, so a mask and a hint cover the same part of the picture.
- ``mask_on_grid``: a MASK [B, H, W] cut to the latent's aspect ratio and area-averaged onto an ``h x w`` grid
  (adaptive average pooling: a cell the mask does not touch gets exactly 0).
- ``Box`` / ``box_on_grid``: a box in fractions of the picture rasterised on a grid by exact cell coverage.

This module does not import ComfyUI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Box:
    """A region in fractions of the picture: left, top, right, bottom in [0, 1]."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self):
        values = (self.x0, self.y0, self.x1, self.y1)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"box {values} has non-finite numbers")
        if not (0 <= self.x0 < self.x1 <= 1 and 0 <= self.y0 < self.y1 <= 1):
            raise ValueError(f"box left {self.x0:g}, top {self.y0:g}, right {self.x1:g}, bottom {self.y1:g}: "
                             "needs 0 <= left < right <= 1 and 0 <= top < bottom <= 1 (fractions of the picture)")


def aspects_match(size_hw: tuple[int, int], target_hw: tuple[int, int]) -> bool:
    """Whether a mask of ``size_hw`` covers the same part of a picture (or latent grid) of ``target_hw``: their aspect
    ratios agree to within 1%, or to within one unit of the target's shorter side where that is coarser (a latent is
    the picture / 8, rounded). The one rule every node that takes a region mask applies."""
    (h, w), (th, tw) = size_hw, target_hw
    return abs((w / h) / (tw / th) - 1) <= max(0.01, 1.0 / min(th, tw))


def center_crop_to_aspect(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centre of `mask` [..., H, W] with the aspect ratio of height x width, cut with the rounding
    ComfyUI's ``common_upscale(..., crop="center")`` uses for hint images."""
    old_h, old_w = mask.shape[-2:]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return mask[..., y : old_h - y, x : old_w - x]


def mask_on_grid(mask: torch.Tensor, grid_h: int, grid_w: int, latent_h: int, latent_w: int) -> torch.Tensor:
    """A MASK [B, H, W] on a token grid: cut to the latent's aspect ratio, area-averaged to grid_h x grid_w.
    Returns [B, grid_h * grid_w] float32."""
    cut = center_crop_to_aspect(mask.float(), latent_h, latent_w)
    return F.adaptive_avg_pool2d(cut[:, None], (grid_h, grid_w)).flatten(1)


def _coverage(lo: float, hi: float, cells: int) -> torch.Tensor:
    edges = torch.arange(cells + 1, dtype=torch.float64) / cells
    return ((torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo))) * cells
            ).clamp(min=0.0)


def box_on_grid(box: Box, grid_h: int, grid_w: int) -> torch.Tensor:
    """A box on a token grid: each cell's covered fraction, [1, grid_h * grid_w] float32."""
    rows = _coverage(box.y0, box.y1, grid_h)
    cols = _coverage(box.x0, box.x1, grid_w)
    return (rows[:, None] * cols[None, :]).float().reshape(1, -1)
