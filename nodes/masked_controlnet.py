"""A ControlNet whose residuals only act inside a region mask: the ComfyUI-facing object Apply Landmark ControlNet
(and DIIR Face Restore) put on the conditioning with ``apply_control``.

``RegionMaskedControl`` is a ``comfy.controlnet.ControlBase`` that owns a copy of the user's CONTROL_NET (hint,
strength and timestep range set on it, no previous control of its own) and sits in the conditioning's control chain
like any ControlNet: ControlNets already on the conditioning (core or another pack's) are its
``previous_controlnet`` and are added unmasked; a ControlNet applied later takes it as its previous one.

At every call each residual the inner control returns (input/middle/output, any resolution) is multiplied by the mask
brought to that residual's grid: the mask is first cut to the latent's aspect ratio exactly as ComfyUI cuts the
hint image (``common_upscale(..., "center")``), so mask and hint stay aligned, then area-averaged onto the residual's
``h x w`` (adaptive average pooling, any aspect ratio). A grid cell the mask does not touch gets exactly zero.
"""

from __future__ import annotations

import comfy.controlnet
import comfy.utils
import torch

from ..magic_core.regions import center_crop_to_aspect


class RegionMaskedControl(comfy.controlnet.ControlBase):
    def __init__(self, inner: comfy.controlnet.ControlBase, mask: torch.Tensor):
        super().__init__()
        if mask.ndim != 3:
            raise ValueError(f"region mask must be [B, H, W], got {tuple(mask.shape)}")
        self.inner = inner
        self.mask = mask.detach().to("cpu", torch.float32).clamp(0.0, 1.0)
        # what ComfyUI's sampling code reads off every control in a chain
        self.strength = inner.strength
        self.timestep_percent_range = inner.timestep_percent_range
        self.extra_hooks = inner.extra_hooks
        self._grids: dict = {}  # "run" -> the latent shape they are for; (h, w) -> mask on that grid

    # --- the control chain ------------------------------------------------------------------------------------------
    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        control_prev = None
        if self.previous_controlnet is not None:
            control_prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        control = self.inner.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if control is None:  # outside the inner control's timestep range
            return control_prev
        masked = {key: [None if x is None else x * self._grid(x, x_noisy, batched_number) for x in outputs]
                  for key, outputs in control.items()}
        return _merge(masked, control_prev)

    def _grid(self, x: torch.Tensor, x_noisy: torch.Tensor, batched_number: int) -> torch.Tensor:
        """The mask on x's grid, [x.shape[0], 1, h, w]."""
        run = (tuple(x_noisy.shape), int(batched_number), x.device, x.dtype)
        if self._grids.get("run") != run:  # a new latent size or batch: start over, keep memory flat
            self._grids = {"run": run}
        h, w = int(x.shape[-2]), int(x.shape[-1])
        grid = self._grids.get((h, w))
        if grid is None:
            cropped = center_crop_to_aspect(self.mask, int(x_noisy.shape[-2]), int(x_noisy.shape[-1]))
            grid = torch.nn.functional.adaptive_avg_pool2d(cropped[:, None], (h, w))
            grid = comfy.controlnet.broadcast_image_to(grid, x.shape[0], batched_number)
            grid = self._grids[(h, w)] = grid.to(device=x.device, dtype=x.dtype)
        return grid

    # --- delegation to the inner control ----------------------------------------------------------------------------
    def pre_run(self, model, percent_to_timestep_function):
        self.inner.pre_run(model, percent_to_timestep_function)
        super().pre_run(model, percent_to_timestep_function)

    def cleanup(self):
        self.inner.cleanup()
        self._grids = {}
        super().cleanup()

    def get_models(self):
        return super().get_models() + self.inner.get_models()

    def get_extra_hooks(self):
        return self.inner.get_extra_hooks() + ([] if self.previous_controlnet is None
                                              else self.previous_controlnet.get_extra_hooks())

    def inference_memory_requirements(self, dtype):
        return super().inference_memory_requirements(dtype) + self.inner.inference_memory_requirements(dtype)

    def copy(self):
        return RegionMaskedControl(self.inner.copy(), self.mask)


def _merge(control: dict, control_prev: dict | None) -> dict:
    """Residuals of this control plus those of the chain before it (ComfyUI's merge rule, without strength)."""
    if control_prev is None:
        return control
    out = {key: list(control.get(key, [])) for key in ("input", "middle", "output")}
    for key in ("input", "middle", "output"):
        mine = out[key]
        for i, prev in enumerate(control_prev.get(key, [])):
            if i >= len(mine):
                mine.append(prev)
            elif prev is not None:
                mine[i] = prev if mine[i] is None else prev + mine[i]
    return out


def apply_control(positive, negative, control_net, image: torch.Tensor, strength: float, percent_range: tuple,
                  region: torch.Tensor | None = None, vae=None) -> tuple[list, list]:
    """Positive and negative conditioning with `control_net` applied on `image` ([B, H, W, C]), confined to `region`
    ([B, H, W], same aspect ratio) when given; ControlNets already on the conditioning stay before it in the chain.
    New lists: the inputs are not changed."""
    hint = image[..., :3].movedim(-1, 1)
    made: dict = {}  # one control per previous control, shared by positive and negative like core's node

    def control_for(previous):
        key = id(previous)
        if key not in made:
            inner = control_net.copy().set_cond_hint(hint, strength, percent_range, vae=vae)
            control = inner if region is None else RegionMaskedControl(inner, region)
            made[key] = control.set_previous_controlnet(previous)
        return made[key]

    out = []
    for conditioning in (positive, negative):
        entries = []
        for embedding, options in conditioning:
            options = {**options, "control": control_for(options.get("control")), "control_apply_to_uncond": False}
            entries.append([embedding, options])
        out.append(entries)
    return out[0], out[1]
