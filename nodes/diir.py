"""DIIR Face Restore: MagicID's DDIM-inversion based ID restoration of every chosen face of an image, leaving every
pixel outside the paste masks untouched (the image side lives in magic_core.diir)."""

from __future__ import annotations

import comfy.samplers
import comfy.utils
import torch
from comfy_api.v0_0_2 import io, ui

from ..magic_core import diir
from ..magic_core import face_draw as fd
from ..magic_core import faces as fc
from ..magic_core import inversion as inv
from .common import (
    CATEGORY,
    FACE_MARGIN_TOOLTIP,
    PREFIX,
    NodeInputError,
    model_family,
    parse_face_indices,
    require_negative,
)
from .diir_restore import FaceRestorer, RestoreSettings, match_identities
from .inversion_sampling import schedule
from .types import FacesType, IdentitiesType

NATIVE_CROP = {"sd15": 512, "sd2x": 768, "sdxl": 1024}
MATCH_MODES = ("by index", "by similarity")


class DIIRFaceRestore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "DIIRFaceRestore",
            display_name="DIIR Face Restore (Magic Portrait)",
            category=CATEGORY + "/magicid",
            description="MagicID's DDIM-inversion based ID restoration: each chosen face is cropped with a margin, "
            "brought to the model's native size, encoded, DDIM-inverted part of the way (strength), denoised again "
            "with its identity (MGMICA on the face) and the landmarks of the crop itself (a landmark ControlNet), "
            "decoded, colour-matched and pasted back: the paste mask is the face (landmark hull with the forehead) grown "
            "by `grow` plus a feather band of `feather`, exactly 0 beyond, so every other pixel stays the input's, bit "
            "for bit; the node text reports the share of the picture that changed. Works after any generator: a "
            "MagicStyle result, a group photo, any image.",
            inputs=[
                io.Image.Input("image"),
                FacesType.Input("faces", tooltip="Detect Faces on this image."),
                io.Model.Input("model"),
                io.Vae.Input("vae"),
                io.Conditioning.Input("positive", tooltip="e.g. 'a photo of a face, detailed skin'."),
                io.String.Input("face_indices", default="all", tooltip="Which faces, e.g. 'all', '0, 2', '-1'."),
                io.Float.Input("margin", default=0.6, min=0.0, max=4.0, step=0.05,
                               tooltip=FACE_MARGIN_TOOLTIP),
                io.Int.Input("crop_size", default=0, min=0, max=2048, step=64,
                             tooltip="0: the model's native size (SD1.5 512, SD2.x 768, SDXL 1024)."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal"),
                io.Int.Input("steps", default=20, min=1, max=1000),
                io.Float.Input("strength", default=0.45, min=0.0, max=1.0, step=0.01,
                               tooltip="How far each face is inverted toward noise before it is denoised again; 0 "
                               "gives the face back through the VAE only."),
                io.Float.Input("cfg", default=4.0, min=0.0, max=30.0, step=0.1, round=0.01),
                io.Combo.Input("inversion_mode", options=list(inv.MODES), default="ddim"),
                io.Float.Input("grow", default=0.1, min=-0.5, max=1.0, step=0.01,
                               tooltip="The paste mask is 1 on the face hull (with the forehead) grown by this share "
                               "of the face's size."),
                io.Float.Input("feather", default=0.12, min=0.0, max=0.5, step=0.01,
                               tooltip="Width of the paste mask's soft edge, as a share of the face's size: outside "
                               "the grown hull it falls smoothly from 1 to exactly 0 across this band; nothing beyond "
                               "changes."),
                io.Combo.Input("color_match", options=list(diir.COLOR_MODES), default="mean_std",
                               tooltip="Move the restored face's LAB mean/std to the original's."),
                io.Combo.Input("identity_match", options=list(MATCH_MODES), default="by index",
                               tooltip="Which identity restores which face: the i-th identity the i-th chosen face "
                               "(left to right), or each face the identity whose reference face embedding is closest."),
                io.Float.Input("identity_weight", default=1.0, min=0.0, max=5.0, step=0.05),
                io.Combo.Input("condition_style", options=list(fd.FACE_CONDITION_STYLES), default="openpose_face"),
                io.Float.Input("control_strength", default=0.6, min=0.0, max=5.0, step=0.05),
                io.Combo.Input("if_no_face", options=["return unchanged", "error"], default="return unchanged"),
                io.Conditioning.Input("negative", optional=True, tooltip="Needed when cfg is not 1."),
                IdentitiesType.Input("identities", optional=True,
                                     tooltip="Add Identity chain: the people to restore (their IP-Adapter tokens)."),
                io.ControlNet.Input("control_net", optional=True,
                                    tooltip="A landmark ControlNet (e.g. OpenPose) driven by each crop's own "
                                    "landmarks."),
            ],
            outputs=[io.Image.Output(display_name="image"), io.Mask.Output(display_name="paste_masks"),
                     io.Image.Output(display_name="before_after")],
        )

    @classmethod
    def execute(cls, image, faces, model, vae, positive, face_indices, margin, crop_size, scheduler, steps, strength,
                cfg, inversion_mode, grow, feather, color_match, identity_match, identity_weight, condition_style,
                control_strength, if_no_face, negative=None, identities=None, control_net=None) -> io.NodeOutput:
        node = cls.define_schema().node_id
        require_negative(node, cfg, negative)
        if not isinstance(faces, fc.FaceDetections):
            raise NodeInputError(node, "faces", "expected MAGIC_FACES from Detect Faces")
        if faces.batch != image.shape[0] or any(s != tuple(image.shape[1:3]) for s in faces.image_sizes):
            raise NodeInputError(node, "faces", f"were found in {faces.batch} image(s) of {faces.image_sizes[:2]} but "
                                 f"the image batch is {image.shape[0]} of {tuple(image.shape[1:3])}: run Detect Faces "
                                 "on this image")
        indices = parse_face_indices(node, face_indices)
        if strength > 0 and len(inv.inversion_sigmas(schedule(model, scheduler, steps, strength))) < 2:
            raise NodeInputError(node, "strength", f"{strength:g} of {steps} steps covers less than one inversion step: "
                                 "raise strength or steps (or set strength 0 for the VAE round trip only)")
        size = crop_size or NATIVE_CROP.get(model_family(model), 512)
        if size % 8:
            raise NodeInputError(node, "crop_size", f"{size} is not a multiple of 8 (the VAE's scale)")
        ids = list(identities or ())
        chosen = []
        for i in range(image.shape[0]):
            try:
                chosen.append(faces.select(i, indices))
            except IndexError as err:
                raise NodeInputError(node, "face_indices", str(err)) from None
        total = sum(len(c) for c in chosen)
        if total == 0:
            if if_no_face == "error":
                raise NodeInputError(node, "faces", "no face to restore in any image (Detect Faces found none, or "
                                     "face_indices chose none)")
            masks = torch.zeros(image.shape[0], *image.shape[1:3])
            return io.NodeOutput(image, masks, image, ui=ui.PreviewText("no face to restore: the image is unchanged"))
        settings = RestoreSettings(crop_size=size, margin=margin, scheduler=scheduler, steps=steps, strength=strength,
                                   cfg=cfg, inversion_mode=inversion_mode, grow=grow, feather=feather,
                                   color_match=color_match, identity_weight=identity_weight,
                                   condition_style=condition_style, control_strength=control_strength)
        run = FaceRestorer(node, model, vae, positive, negative, control_net, settings, comfy.utils.ProgressBar(total))
        out_images, out_masks, previews, notes = [], [], [], []
        for i in range(image.shape[0]):
            source = image[i, ..., :3].detach().cpu().float().numpy()
            matched = match_identities(node, chosen[i], ids, identity_match, notes, i)
            restored, union = run.image(source, chosen[i], matched)
            out_images.append(torch.from_numpy(restored))
            out_masks.append(torch.from_numpy(union))
            previews.append(torch.from_numpy(diir.side_by_side(source, restored)))
        result = torch.stack(out_images).to(image.dtype)
        masks = torch.stack(out_masks)
        # measured on the output: the pixels whose value differs from the input's in any channel
        changed = (result != image[..., :3].detach().cpu()).any(dim=-1)
        pixels = changed.numel()
        report = (f"restored {total} face(s) in {image.shape[0]} image(s): crop {size} px, {steps} steps at strength "
                  f"{strength:g}, cfg {cfg:g}, {inversion_mode}\n"
                  f"changed {100.0 * int(changed.sum()) / pixels:.2f}% of the picture ({int(changed.sum())} of {pixels} "
                  f"pixels); paste masks {100.0 * int((masks > 0).sum()) / pixels:.2f}% (face hull grown by "
                  f"{grow:g} x face size, feather band {feather:g} x face size)" + "".join(f"\n{n}" for n in notes))
        if image.shape[-1] > 3:  # keep the alpha channel
            result = torch.cat([result, image[..., 3:].detach().cpu()], dim=-1)
        return io.NodeOutput(result, masks, torch.stack(previews),
                             ui=ui.PreviewText(report))


NODES = [DIIRFaceRestore]
