"""DIIR Face Restore's machinery: restore each chosen face of an image by partial DDIM inversion of its crop and
guided resampling (its identity through MGMICA, its landmarks through a masked ControlNet), then paste it back through
a compact mask (the image side lives in magic_core.diir)."""

from __future__ import annotations

from dataclasses import dataclass

import comfy.samplers
import numpy as np
import torch

from ..magic_core import diir
from ..magic_core import face_crop as crop
from ..magic_core import face_draw as fd
from ..magic_core import faces as fc
from ..magic_core import inversion as inv
from .common import NodeInputError
from .inversion_sampling import guided_run, reverse_sampler_function, run_inversion, schedule
from .masked_controlnet import apply_control
from .mgmica_patch import Identity, apply_mgmica


def match_identities(node, faces, ids, mode, notes, image_index):
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
    matched = [None if k is None else ids[k] for k in fc.greedy_match(similarity)]
    for f, ident in enumerate(matched):
        notes.append(f"image {image_index}, face {f}: "
                     + (f"{ident.label} (similarity {similarity[f, ids.index(ident)]:.2f})" if ident else "no identity"))
    return matched


@dataclass(frozen=True)
class RestoreSettings:
    """DIIR Face Restore's widgets that shape every face's restoration (see the node's tooltips)."""

    crop_size: int
    margin: float
    scheduler: str
    steps: int
    strength: float
    cfg: float
    inversion_mode: str
    grow: float
    feather: float
    color_match: str
    identity_weight: float
    condition_style: str
    control_strength: float


class FaceRestorer:
    """Restores faces one by one with the model, conditioning and settings of one run."""

    def __init__(self, node: str, model, vae, positive, negative, control_net, settings: RestoreSettings, progress):
        self.node, self.model, self.vae = node, model, vae
        self.positive, self.negative, self.control_net = positive, negative, control_net
        self.settings, self.progress = settings, progress
        self.sigmas = (schedule(model, settings.scheduler, settings.steps, settings.strength)
                       if settings.strength > 0 else None)

    def image(self, source: np.ndarray, faces, identities) -> tuple[np.ndarray, np.ndarray]:
        """One image with its faces restored in order (left to right), and the union of the paste masks."""
        s = self.settings
        h, w = source.shape[:2]
        current = source
        union = np.zeros((h, w), dtype=np.float32)
        for face, identity in zip(faces, identities, strict=True):
            grow, feather = s.grow * face.size, s.feather * face.size
            box = crop.face_square(face, s.margin, contain=diir.paste_extent(face, grow, feather))
            mask = diir.paste_mask(face, box, h, w, grow, feather)
            cut = crop.cut_square(current, box, s.crop_size, outside="mirror")
            restored = self.face(cut, crop.face_in_crop(face, box, s.crop_size), identity)
            current = diir.paste(current, restored, box, mask)
            union = np.maximum(union, mask)
            self.progress.update(1)
        # bit-identical outside every paste mask, whatever the blending did
        return np.where(union[..., None] > 0, current, source).astype(np.float32), union

    def face(self, crop: np.ndarray, face: fc.Face, identity: Identity | None) -> np.ndarray:
        """The restored crop (size x size x 3) of one face, colour-matched to the crop it came from."""
        size = self.settings.crop_size
        pixels = torch.from_numpy(crop)[None]
        latent = self.vae.encode(pixels)
        if self.sigmas is not None:
            region = diir.region_mask(face, size, size, self.settings.grow * face.size, 0.0)
            latent = self._invert_and_resample(latent, face, identity, torch.from_numpy(region)[None])
        decoded = self.vae.decode(latent)
        decoded = decoded.reshape(-1, *decoded.shape[-3:])[0].detach().cpu().float().numpy()
        region = diir.region_mask(face, size, size, 0.0, 0.0)
        return diir.match_colors(decoded, crop, region, self.settings.color_match)

    def _invert_and_resample(self, latent: torch.Tensor, face: fc.Face, identity: Identity | None,
                             region: torch.Tensor) -> torch.Tensor:
        """Invert part of the way with the model as it is (cfg 1), then denoise with the identity and landmarks."""
        s = self.settings
        inverted, _, partner, _ = run_inversion(self.model, self.positive, None, 1.0, latent, self.sigmas,
                                                s.inversion_mode, 3, inv.EDICT_DEFAULT_MIX)
        model = self.model
        if identity is not None:
            one = Identity(identity.embeds, region, identity.weight * s.identity_weight, identity.start_percent,
                           identity.end_percent, identity.label)
            model, _ = apply_mgmica(self.model, (one,), 1.0, "exclusive", "negative tokens", "all = 1", self.node)
        positive, negative = self.positive, self.negative if self.negative is not None else self.positive
        if self.control_net is not None and s.control_strength > 0:
            drawn = fd.draw_face_condition(s.condition_style, [face], s.crop_size, s.crop_size)
            hint = torch.from_numpy(drawn).float().div(255.0)[None]
            positive, negative = apply_control(positive, negative, self.control_net, hint, s.control_strength,
                                               (0.0, 1.0), region)
        process_in = model.get_model_object("latent_format").process_in
        sampler = comfy.samplers.KSAMPLER(reverse_sampler_function(s.inversion_mode, inv.EDICT_DEFAULT_MIX, partner,
                                                                   process_in))
        return guided_run(model, positive, negative if s.cfg != 1.0 else None, s.cfg, inverted, sampler,
                          inv.inversion_sigmas(self.sigmas).flip(0))
