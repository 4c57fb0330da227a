"""Apply Landmark ControlNet: a CONTROL_NET with a face condition image on positive and negative conditioning,
optionally confined to face regions by a MASK (see masked_controlnet.RegionMaskedControl)."""

from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io, ui

from ..magic_core import regions as reg
from .common import CATEGORY, PREFIX, NodeInputError, check_percent_range
from .masked_controlnet import apply_control


def _as_mask(node: str, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    mask = mask if mask.ndim == 3 else mask.reshape(-1, *mask.shape[-2:])
    if mask.ndim != 3 or mask.shape[0] == 0:
        raise NodeInputError(node, "mask", f"expected a MASK [B, H, W], got shape {tuple(mask.shape)}")
    (mh, mw), (ih, iw) = mask.shape[-2:], image.shape[1:3]
    if not reg.aspects_match((mh, mw), (ih, iw)):
        raise NodeInputError(node, "mask", f"is {mw}x{mh} but the condition image is {iw}x{ih}: their aspect ratios "
                             "differ, so the mask would not cover the same part of the picture. Make the mask at the "
                             "image's size (e.g. Face Masks on the same faces the condition was drawn from)")
    if mask.shape[0] not in (1, image.shape[0]) and image.shape[0] != 1:
        raise NodeInputError(node, "mask", f"batch {mask.shape[0]} must be 1 or the image batch {image.shape[0]}")
    return mask


class ApplyLandmarkControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "ApplyLandmarkControlNet",
            display_name="Apply Landmark ControlNet (Magic Portrait)",
            category=CATEGORY + "/magicid",
            description="Apply a ControlNet with a face condition image (Draw Face Condition: InstantID keypoints, "
            "OpenPose face points, landmark contours, skeleton + landmarks) to positive and negative conditioning. "
            "With a MASK, the control's residuals act only inside the face regions (masked at each residual's "
            "resolution, any aspect ratio). ControlNets already on the conditioning keep working; strength 0 "
            "changes nothing.",
            inputs=[
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.ControlNet.Input("control_net"),
                io.Image.Input("image", tooltip="The condition image, at the size of the picture being generated."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001),
                io.Mask.Input("mask", optional=True,
                              tooltip="Where the control acts (1) and where not (0), e.g. Face Masks' union. Same "
                              "aspect ratio as the image; soft edges scale the residuals."),
                io.Vae.Input("vae", optional=True, tooltip="For ControlNets that need one (as in core's node)."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, positive, negative, control_net, image, strength, start_percent, end_percent, mask=None,
                vae=None) -> io.NodeOutput:
        node = cls.define_schema().node_id
        check_percent_range(node, start_percent, end_percent)
        if strength == 0:
            return io.NodeOutput(positive, negative, ui=ui.PreviewText("strength 0: conditioning unchanged"))
        region = None if mask is None else _as_mask(node, mask, image)
        positive_out, negative_out = apply_control(positive, negative, control_net, image, strength,
                                                   (start_percent, end_percent), region, vae)
        report = f"strength {strength:g}, steps {start_percent:g}-{end_percent:g}"
        if region is not None:
            covered = float(region.gt(0).float().mean())
            report += f"; mask covers {100 * covered:.1f}% of the picture"
            if covered == 0:
                report += " (an empty mask: the control has no effect)"
        return io.NodeOutput(positive_out, negative_out, ui=ui.PreviewText(report))


NODES = [ApplyLandmarkControlNet]
