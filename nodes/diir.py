"""DIIR Face Restore: MagicID's DDIM-inversion based ID restoration of every chosen face of an image, leaving every
pixel outside the paste masks untouched (the image side lives in magic_core.diir)."""

from __future__ import annotations

import comfy.samplers
import comfy.utils
import numpy as np
import torch
from comfy_api.v0_0_2 import io, ui

from ..magic_core import diir
from ..magic_core import face_draw as fd
from ..magic_core import faces as fc
from ..magic_core import inversion as inv
from .common import CATEGORY, PREFIX, NodeInputError, model_family
from .inversion_sampling import guided_run, reverse_sampler_function, run_inversion, schedule
from .landmark_control import apply_control
from .magicid import Identity, apply_mgmica
from .types import FacesType, IdentitiesType

NATIVE_CROP = {"sd15": 512, "sd2x": 768, "sdxl": 1024}
CONDITION_STYLES = ("openpose_face", "instantid_kps", "landmark_contours")
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
                               tooltip="Room around the face on each side, as a share of its size (crop side = "
                               "(1 + 2 x margin) x face size)."),
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
                io.Combo.Input("condition_style", options=list(CONDITION_STYLES), default="openpose_face"),
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
        if cfg != 1.0 and negative is None:
            raise NodeInputError(node, "negative", f"cfg is {cfg}: connect a negative conditioning or set cfg to 1")
        if not isinstance(faces, fc.FaceDetections):
            raise NodeInputError(node, "faces", "expected MAGIC_FACES from Detect Faces")
        if faces.batch != image.shape[0] or any(s != tuple(image.shape[1:3]) for s in faces.image_sizes):
            raise NodeInputError(node, "faces", f"were found in {faces.batch} image(s) of {faces.image_sizes[:2]} but "
                                 f"the image batch is {image.shape[0]} of {tuple(image.shape[1:3])}: run Detect Faces "
                                 "on this image")
        try:
            indices = fc.parse_indices(face_indices)
        except ValueError as err:
            raise NodeInputError(node, "face_indices", str(err)) from None
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
        run = _Restorer(node, model, vae, positive, negative, size, margin, scheduler, steps, strength, cfg,
                        inversion_mode, grow, feather, color_match, identity_weight, condition_style, control_strength,
                        control_net, comfy.utils.ProgressBar(total))
        out_images, out_masks, previews, notes = [], [], [], []
        for i in range(image.shape[0]):
            source = image[i, ..., :3].detach().cpu().float().numpy()
            matched = _match_identities(node, chosen[i], ids, identity_match, notes, i)
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


def _match_identities(node, faces, ids, mode, notes, image_index):
    """The identity (or None) for each face of one image."""
    if not ids:
        return [None] * len(faces)
    if mode == "by index":
        if len(ids) < len(faces):
            notes.append(f"image {image_index}: {len(faces)} faces but {len(ids)} identities; faces "
                         f"{list(range(len(ids), len(faces)))} are restored from their landmarks only")
        return [ids[k] if k < len(ids) else None for k in range(len(faces))]
    kinds = {i.embeds.embedding_kind for i in ids}
    if any(i.embeds.face_embedding is None for i in ids):
        raise NodeInputError(node, "identity_match", "'by similarity' needs each identity's reference face embedding: "
                             "connect Detect Faces to ID Embeds' faces input, or match 'by index'")
    if any(f.embedding is None or f.embedding_kind not in kinds for f in faces):
        raise NodeInputError(node, "identity_match", f"the faces' embeddings ({faces[0].embedding_kind}) are not of the "
                             f"identities' kind ({', '.join(sorted(map(str, kinds)))}): detect both with the same "
                             "face back-end")
    similarity = np.array([[float(np.dot(f.embedding, i.embeds.face_embedding)) for i in ids] for f in faces])
    matched: list = [None] * len(faces)
    taken: set = set()
    for flat in np.argsort(-similarity, axis=None):  # greedy: the most similar pairs first, one face per identity
        f, k = divmod(int(flat), len(ids))
        if matched[f] is None and k not in taken:
            matched[f], taken = ids[k], taken | {k}
    for f, ident in enumerate(matched):
        notes.append(f"image {image_index}, face {f}: "
                     + (f"{ident.label} (similarity {similarity[f, ids.index(ident)]:.2f})" if ident else "no identity"))
    return matched


class _Restorer:
    """Everything one run needs to restore faces (the model, conditioning and settings)."""

    def __init__(self, node, model, vae, positive, negative, size, margin, scheduler, steps, strength, cfg, mode, grow,
                 feather, color_match, identity_weight, condition_style, control_strength, control_net, progress):
        self.node, self.model, self.vae = node, model, vae
        self.positive, self.negative = positive, negative
        self.size, self.margin, self.strength, self.cfg, self.mode = size, margin, strength, cfg, mode
        self.grow, self.feather, self.color_match = grow, feather, color_match
        self.identity_weight, self.condition_style, self.control_strength = identity_weight, condition_style, \
            control_strength
        self.control_net, self.progress = control_net, progress
        self.sigmas = schedule(model, scheduler, steps, strength) if strength > 0 else None

    def image(self, source: np.ndarray, faces, identities) -> tuple[np.ndarray, np.ndarray]:
        """One image with its faces restored in order (left to right), and the union of the paste masks."""
        h, w = source.shape[:2]
        current = source
        union = np.zeros((h, w), dtype=np.float32)
        for face, identity in zip(faces, identities, strict=True):
            grow, feather = self.grow * face.size, self.feather * face.size
            box = diir.crop_box(face, self.margin, contain=diir.paste_extent(face, grow, feather))
            mask = diir.paste_mask(face, box, h, w, grow, feather)
            crop = diir.extract_crop(current, box, self.size)
            restored = self.face(crop, diir.face_in_crop(face, box, self.size), identity)
            current = diir.paste(current, restored, box, mask)
            union = np.maximum(union, mask)
            self.progress.update(1)
        # bit-identical outside every paste mask, whatever the blending did
        return np.where(union[..., None] > 0, current, source).astype(np.float32), union

    def face(self, crop: np.ndarray, face: fc.Face, identity: Identity | None) -> np.ndarray:
        """The restored crop (size x size x 3) of one face, colour-matched to the crop it came from."""
        pixels = torch.from_numpy(crop)[None]
        latent = self.vae.encode(pixels)
        if self.sigmas is not None:
            region = diir.region_mask(face, self.size, self.size, self.grow * face.size, 0.0)
            latent = self._reinvent(latent, face, identity, torch.from_numpy(region)[None])
        decoded = self.vae.decode(latent)
        decoded = decoded.reshape(-1, *decoded.shape[-3:])[0].detach().cpu().float().numpy()
        region = diir.region_mask(face, self.size, self.size, 0.0, 0.0)
        return diir.match_colors(decoded, crop, region, self.color_match)

    def _reinvent(self, latent: torch.Tensor, face: fc.Face, identity: Identity | None, region: torch.Tensor):
        """Invert part of the way with the model as it is (cfg 1), then denoise with the identity and landmarks."""
        inverted, _, partner, _ = run_inversion(self.model, self.positive, None, 1.0, latent, self.sigmas, self.mode,
                                                3, inv.EDICT_DEFAULT_MIX)
        model = self.model
        if identity is not None:
            one = Identity(identity.embeds, region, identity.weight * self.identity_weight, identity.start_percent,
                           identity.end_percent, identity.label)
            model, _ = apply_mgmica(self.model, (one,), 1.0, "exclusive", "negative tokens", "all = 1", self.node)
        positive, negative = self.positive, self.negative if self.negative is not None else self.positive
        if self.control_net is not None and self.control_strength > 0:
            drawn = _draw(self.condition_style, face, self.size)
            positive, negative = apply_control(positive, negative, self.control_net, drawn, self.control_strength,
                                               (0.0, 1.0), region)
        process_in = model.get_model_object("latent_format").process_in
        sampler = comfy.samplers.KSAMPLER(reverse_sampler_function(self.mode, inv.EDICT_DEFAULT_MIX, partner,
                                                                   process_in))
        return guided_run(model, positive, negative if self.cfg != 1.0 else None, self.cfg, inverted, sampler,
                          inv.inversion_sigmas(self.sigmas).flip(0))


def _draw(style: str, face: fc.Face, size: int) -> torch.Tensor:
    if style == "instantid_kps":
        drawn = fd.draw_instantid_kps([face], size, size)
    elif style == "landmark_contours":
        drawn = fd.draw_landmark_contours([face], size, size)
    else:
        drawn = fd.draw_openpose_face([face], size, size)
    return torch.from_numpy(drawn).float().div(255.0)[None]


NODES = [DIIRFaceRestore]
