"""MagicID identity nodes: Load IP-Adapter, ID Embeds, Add Identity and Multi-ID Attention (MGMICA).

A workflow holds any number of identities by chaining Add Identity; Multi-ID Attention puts all of them into one
patch over every cross-attention layer (nodes.mgmica_patch), each confined to its own region.
"""

from __future__ import annotations

import os

import folder_paths
import numpy as np
import torch
from comfy_api.v0_0_2 import io, ui

from ..magic_core import faces as fc
from ..magic_core import ipadapter as ip
from ..magic_core import ipadapter_tokens as ip_tokens
from ..magic_core import mgmica
from ..magic_core import regions as reg
from . import id_references as refs
from .common import CATEGORY, FACE_MARGIN_TOOLTIP, PREFIX, NodeInputError, check_percent_range, register_model_folder
from .mgmica_patch import UNCOND_MODES, IDEmbeds, Identity, apply_mgmica
from .types import FacesType, IDEmbedsType, IdentitiesType, IPAdapterType

FOLDER = "ipadapter"
EXTENSIONS = {".safetensors", ".bin", ".pt", ".pth"}
AUTO_VARIANT = "auto (from the file)"
VARIANT_CHOICES = [AUTO_VARIANT, "plus", "plus-face", "faceid-plus", "faceid-plusv2", "faceid", "faceid-portrait",
                   "faceid-portrait-unnorm", "instantid"]
CROP_CHOICES = ["auto", "face", "whole image"]
COMBINE_CHOICES = ["average", "stack"]
CLIP_SIZE = 224
register_model_folder(FOLDER, EXTENSIONS)

_LOADED: dict = {}  # (path, mtime, size, variant) -> IPAdapterFile; a few, so re-running a graph reuses them


def _load(path: str, variant: str | None) -> ip.IPAdapterFile:
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size, variant)
    if key not in _LOADED:
        if len(_LOADED) >= 4:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = ip.load_ipadapter_file(path, variant=variant)
    return _LOADED[key]


class LoadIPAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "LoadIPAdapter",
            display_name="Load IP-Adapter (Magic Portrait)",
            category=CATEGORY + "/magicid",
            description="Load an IP-Adapter file from models/ipadapter (.safetensors, or .bin read safely): base, "
            "plus, plus-face, full-face, FaceID, FaceID-Plus, FaceID-PlusV2, portrait, for SD1.5 and SDXL. The "
            "variant and family are read from the file's keys and shown on the node.",
            inputs=[
                io.Combo.Input("ipadapter_file", options=folder_paths.get_filename_list(FOLDER)),
                io.Combo.Input("variant", options=VARIANT_CHOICES, default=AUTO_VARIANT,
                               tooltip="Only where the keys cannot tell (plus vs plus-face, FaceID-Plus vs PlusV2, "
                               "...): by default the file name decides."),
            ],
            outputs=[IPAdapterType.Output(display_name="ipadapter")],
        )

    @classmethod
    def execute(cls, ipadapter_file, variant) -> io.NodeOutput:
        node = cls.define_schema().node_id
        path = folder_paths.get_full_path(FOLDER, ipadapter_file)
        if path is None:
            where = ", ".join(folder_paths.get_folder_paths(FOLDER))
            raise NodeInputError(node, "ipadapter_file", f"'{ipadapter_file}' is not in the ipadapter folders ({where})")
        try:
            adapter = _load(path, None if variant == AUTO_VARIANT else variant)
        except ip.IPAdapterError as err:
            raise NodeInputError(node, "variant" if "variant" in str(err) else "ipadapter_file", str(err)) from None
        return io.NodeOutput(adapter, ui=ui.PreviewText(adapter.describe()))


# ------------------------------------------------------------------------------------------------ ID embeds
class IDEmbedsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "IDEmbeds",
            display_name="ID Embeds (Magic Portrait)",
            category=CATEGORY + "/magicid",
            description="One identity's ID tokens from one or more reference images, through the IP-Adapter's "
            "projection, computed as the original IP-Adapter computes them: FaceID variants take insightface's 512-d "
            "ArcFace embedding of the chosen face; the Plus variants also the CLIP vision features of the aligned "
            "face crop; base/plus/plus-face the CLIP vision features of the image or of the face. References and "
            "face crops reach CLIP vision at their own size through ComfyUI's own preprocessing (as core "
            "CLIPVisionEncode does). Several references are averaged or stacked. The crops output shows what CLIP "
            "vision sees.",
            inputs=[
                IPAdapterType.Input("ipadapter"),
                io.Image.Input("images", tooltip="Reference image(s) of ONE person: a batch is several references."),
                FacesType.Input("faces", optional=True,
                                tooltip="Detect Faces on the same images: needed by FaceID variants and for face "
                                "crops."),
                io.Int.Input("face_index", default=0, min=-64, max=64,
                             tooltip="Which face of each reference image (left to right from 0; -1: the rightmost)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Needed by every variant except FaceID / FaceID portrait."),
                io.Combo.Input("combine", options=COMBINE_CHOICES, default="average",
                               tooltip="Several references: average their embeddings (one token set), or stack "
                               "every reference's tokens (PhotoMaker-style)."),
                io.Combo.Input("image_crop", options=CROP_CHOICES, default="auto",
                               tooltip="What CLIP vision sees for base/plus/plus-face: 'auto' = the face when faces "
                               "are connected, else the whole image. FaceID-Plus always uses the aligned face."),
                io.Float.Input("face_margin", default=0.2, min=0.0, max=1.5, step=0.05,
                               tooltip=FACE_MARGIN_TOOLTIP + " Magic Portrait 0.2 counted both sides "
                               "together: halve a value saved with it to keep its crop."),
                io.Float.Input("shortcut_scale", default=1.0, min=0.0, max=5.0, step=0.05,
                               tooltip="FaceID-PlusV2 only: weight of the face-embedding shortcut (s_scale; tokens = "
                               "MLP tokens + s_scale x perceiver). 1.0 is the original IP-Adapter's default and "
                               "IPAdapter_plus's IPAdapterFaceID weight_faceidv2 default; IPAdapter_plus's "
                               "IPAdapter / IPAdapterAdvanced nodes use 2 x their weight: set that to reproduce "
                               "them."),
                io.Combo.Input("negative_image", options=refs.NEGATIVE_CHOICES, default=refs.NEGATIVE_CLIP_MEAN,
                               optional=True,
                               tooltip="The image behind the negative (unconditional) tokens of the variants that "
                               "encode one (plus, plus-face, full-face, FaceID-Plus). 'clip mean': zero pixel values "
                               "after CLIP normalisation, what the original IP-Adapter trained its image drop with "
                               "and feeds at inference (the default: the adapters learned it as 'no image'). "
                               "'black': a black image, what IPAdapter_plus encodes, to reproduce its workflows."),
                io.Combo.Input("faceid_plus_alignment", options=refs.ALIGN_CHOICES, default=refs.ALIGN_ORIGINAL,
                               optional=True,
                               tooltip="FaceID-Plus(V2): the aligned face crop's size. 224 px is what the original "
                               "IP-Adapter trained on and uses for SD1.5 and SDXL; IPAdapter_plus aligns SDXL faces "
                               "at 256 px (a slightly smaller face in CLIP's 224 px view)."),
            ],
            outputs=[IDEmbedsType.Output(display_name="id_embeds"), io.Image.Output(display_name="crops")],
        )

    @classmethod
    def execute(cls, ipadapter, images, face_index, combine, image_crop, face_margin, shortcut_scale, faces=None,
                clip_vision=None, negative_image=refs.NEGATIVE_CLIP_MEAN,
                faceid_plus_alignment=refs.ALIGN_ORIGINAL) -> io.NodeOutput:
        node = cls.define_schema().node_id
        adapter: ip.IPAdapterFile = ipadapter
        refs_count = images.shape[0]
        chosen = _chosen_faces(node, adapter, faces, refs_count, face_index, image_crop)
        if negative_image not in refs.NEGATIVE_CHOICES:
            raise NodeInputError(node, "negative_image", f"{negative_image!r}: choose one of "
                                 f"{', '.join(refs.NEGATIVE_CHOICES)}")
        face_emb = None
        if adapter.needs_face_embedding:
            if chosen[0].embedding_kind != fc.ARCFACE_512 or chosen[0].embedding is None:
                raise NodeInputError(node, "faces", ip_tokens.DLIB_EMBEDDING_MESSAGE if chosen[0].embedding_kind == fc.DLIB_128
                                     else f"the faces carry no ArcFace embedding ({chosen[0].backend}); "
                                     "FaceID IP-Adapters need insightface's 512-d ArcFace embedding")
            raw = adapter.variant in ("faceid-portrait-unnorm", "instantid")
            face_emb = torch.from_numpy(np.stack([f.embedding * (f.embedding_norm if raw else 1.0) for f in chosen]))
        crops_shown = None
        hidden = embeds = hidden_neg = None
        align = refs.align_size(faceid_plus_alignment, adapter.family)
        if adapter.needs_clip_hidden or adapter.needs_clip_embeds:
            if clip_vision is None:
                raise NodeInputError(node, "clip_vision", f"this {adapter.variant} IP-Adapter needs CLIP vision "
                                     "features: connect a CLIP_VISION (Load CLIP Vision), e.g. "
                                     "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors for SD1.5 and most SDXL files")
            if adapter.variant in ("faceid-plus", "faceid-plusv2"):
                crops = [refs.aligned_face(images[i], f, align) for i, f in enumerate(chosen)]
            elif chosen is not None and image_crop != "whole image":
                crops = [refs.face_box_crop(images[i], f, face_margin) for i, f in enumerate(chosen)]
            else:
                crops = [images[i:i + 1, ..., :3].float() for i in range(refs_count)]
            embeds, hidden = refs.encode(clip_vision, crops)
            crops_shown = refs.what_clip_sees(clip_vision, crops)
            if adapter.needs_clip_hidden:
                hidden_neg = refs.negative_hidden(clip_vision, negative_image)
        try:
            positive, negative = _tokens(adapter, combine, refs_count, embeds, hidden, hidden_neg, face_emb,
                                         shortcut_scale)
        except ip.IPAdapterError as err:
            raise NodeInputError(node, "clip_vision" if "CLIP" in str(err) else "faces", str(err)) from None
        if crops_shown is None:
            crops_shown = torch.cat([refs.aligned_face(images[i], f, CLIP_SIZE) for i, f in enumerate(chosen)])
        refs_text = ("1 reference" if refs_count == 1
                     else f"{refs_count} references {'averaged' if combine == 'average' else 'stacked'}")
        label = (f"{adapter.variant}: {refs_text}, {positive.shape[1]} tokens"
                 + (f", face {face_index}" if chosen is not None else ""))
        detail = label
        if adapter.needs_clip_hidden:
            detail += f"; negative image: {negative_image}"
        if adapter.variant in ("faceid-plus", "faceid-plusv2"):
            detail += f"; face aligned at {align} px"
        face_embedding, kind = fc.mean_embedding(chosen)
        embeds_out = IDEmbeds(adapter, positive.float().cpu(), negative.float().cpu(), label, face_embedding, kind)
        return io.NodeOutput(embeds_out, crops_shown, ui=ui.PreviewText(detail))


def _chosen_faces(node, adapter, faces, refs, face_index, image_crop):
    """The face of each reference image (or None when no faces are connected and none are needed)."""
    needs = adapter.needs_face_embedding or adapter.variant in ("faceid-plus", "faceid-plusv2") or image_crop == "face"
    if faces is None:
        if needs:
            why = ("crops the face" if image_crop == "face" else f"the {adapter.variant} IP-Adapter needs the face")
            raise NodeInputError(node, "faces", f"connect Detect Faces on the reference images: {why}")
        return None
    if not isinstance(faces, fc.FaceDetections):
        raise NodeInputError(node, "faces", "expected MAGIC_FACES from Detect Faces")
    if faces.batch != refs:
        raise NodeInputError(node, "faces", f"holds detections of {faces.batch} image(s) but {refs} reference "
                             "image(s) are connected: run Detect Faces on these same images")
    chosen = []
    for i in range(refs):
        try:
            chosen.append(faces.select(i, [face_index])[0])
        except IndexError as err:
            raise NodeInputError(node, "face_index", str(err)) from None
    return chosen


def _tokens(adapter, combine, refs, embeds, hidden, hidden_neg, face_emb, shortcut_scale):
    """(positive, negative) ID tokens [1, T, C]; 'stack' repeats the negative set so both have T tokens."""
    if combine == "average" and refs > 1:
        embeds = None if embeds is None else ip_tokens.combine_embeddings(embeds, "average")
        hidden = None if hidden is None else ip_tokens.combine_embeddings(hidden, "average")
        face_emb = None if face_emb is None else ip_tokens.combine_embeddings(face_emb, "average")
    kwargs = {"shortcut_scale": float(shortcut_scale)}
    positive = ip_tokens.id_tokens(adapter, clip_embeds=embeds, clip_hidden=hidden, face_embedding=face_emb, **kwargs)
    negative = ip_tokens.uncond_tokens(adapter, clip_embeds=None if embeds is None else embeds[:1], clip_hidden=hidden_neg,
                                batch=1, **kwargs)
    if positive.shape[0] > 1:  # stack
        positive = ip_tokens.combine_tokens(positive, "stack")
        negative = negative.repeat(1, refs, 1)
    return positive, negative


# ------------------------------------------------------------------------------------------------ identities
class AddIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "AddIdentity",
            display_name="Add Identity (Magic Portrait)",
            category=CATEGORY + "/magicid",
            description="Append one identity (its ID embeds, a region, a weight, a step range) to an identity list; "
            "chain this node for as many people as the picture has. The region is a MASK (e.g. Face Masks, any "
            "mask at the picture's size) or, without one, a box in fractions of the picture (layout control).",
            inputs=[
                IDEmbedsType.Input("id_embeds"),
                io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001),
                io.Int.Input("mask_index", default=0, min=-1, max=4096,
                             tooltip="Which mask of a MASK batch (e.g. Face Masks' one per face, left to right); "
                             "-1: the batch as it is (one mask per picture of the sampled batch, or one shared)."),
                io.Float.Input("box_left", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Used when no mask is connected: the region as a box, fractions of the "
                               "picture's width/height."),
                io.Float.Input("box_top", default=0.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input("box_right", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input("box_bottom", default=1.0, min=0.0, max=1.0, step=0.01),
                io.String.Input("label", default="", tooltip="A name shown in reports and errors."),
                IdentitiesType.Input("identities", optional=True, tooltip="The list to append to (chain)."),
                io.Mask.Input("mask", optional=True),
            ],
            outputs=[IdentitiesType.Output(display_name="identities")],
        )

    @classmethod
    def execute(cls, id_embeds, weight, start_percent, end_percent, mask_index, box_left, box_top, box_right,
                box_bottom, label, identities=None, mask=None) -> io.NodeOutput:
        node = cls.define_schema().node_id
        if not isinstance(id_embeds, IDEmbeds):
            raise NodeInputError(node, "id_embeds", "expected MAGIC_ID_EMBEDS from ID Embeds")
        check_percent_range(node, start_percent, end_percent)
        previous = tuple(identities or ())
        name = label.strip() or f"identity {len(previous)}"
        if mask is not None:
            masks = mask.reshape(-1, *mask.shape[-2:]).float().cpu()
            if mask_index >= masks.shape[0]:
                raise NodeInputError(node, "mask_index", f"{mask_index} but the MASK batch has {masks.shape[0]} "
                                     f"mask(s) (0-{masks.shape[0] - 1})")
            region = masks if mask_index < 0 else masks[mask_index: mask_index + 1]
            where = f"mask {mask_index}" if mask_index >= 0 else f"{masks.shape[0]} mask(s)"
        else:
            try:
                region = reg.Box(box_left, box_top, box_right, box_bottom)
            except ValueError as err:
                raise NodeInputError(node, "box_right" if box_right <= box_left else "box_bottom", str(err)) from None
            where = f"box {box_left:g},{box_top:g}-{box_right:g},{box_bottom:g}"
        out = (*previous, Identity(id_embeds, region, float(weight), float(start_percent), float(end_percent), name))
        return io.NodeOutput(out, ui=ui.PreviewText(f"{len(out)} identities; {name}: {id_embeds.label}, {where}, "
                                                    f"weight {weight:g}"))


# ------------------------------------------------------------------------------------------------ MGMICA
class MultiIDAttentionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "MultiIDAttention",
            display_name="Multi-ID Attention (MGMICA, Magic Portrait)",
            category=CATEGORY + "/magicid",
            description="MagicID's mask-guided multi-ID cross-attention: one patch carries every identity of the list "
            "into every cross-attention layer, each identity's attention confined to its own region (Z = "
            "Attn(Q, K_txt, V_txt) + sum_i w_i M_i Attn(Q, K_i, V_i)). Another pack's IP-Adapter or attention "
            "patch keeps running beside it, before or after; several of these nodes add up.",
            inputs=[
                io.Model.Input("model"),
                IdentitiesType.Input("identities"),
                io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05,
                               tooltip="Multiplies every identity's weight."),
                io.Combo.Input("overlap", options=list(mgmica.OVERLAP_MODES), default="exclusive",
                               tooltip="Where regions overlap: exclusive (each token to the identity whose mask is "
                               "largest there), weighted (they add up) or normalized (shared)."),
                io.Combo.Input("uncond", options=list(UNCOND_MODES), default=UNCOND_MODES[0],
                               tooltip="The unconditional CFG branch: IP-Adapter's negative ID tokens, no identity "
                               "attention, or the positive tokens."),
                io.String.Input("layer_weights", default="all = 1", multiline=True,
                                tooltip="Per-layer weights 'LAYERS = WEIGHT' separated by ';' or new lines, later "
                                "entries win, unnamed layers get 0. E.g. 'all = 0; instantstyle_style = 1' "
                                "(InstantStyle-style block targeting) or 'input = 0.5; output = 1'."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, identities, weight, overlap, uncond, layer_weights) -> io.NodeOutput:
        node = cls.define_schema().node_id
        clone, patch = apply_mgmica(model, identities, weight, overlap, uncond, layer_weights, node)
        active = sum(1 for w in patch.layer_weights.values() if w)
        lines = [f"{len(patch.identities)} identities over {active} cross-attention layers, overlap {overlap}, "
                 f"uncond: {uncond}"]
        lines += [f"- {i.label}: weight {i.weight:g}" for i in patch.identities]
        return io.NodeOutput(clone, ui=ui.PreviewText("\n".join(lines)))


NODES = [LoadIPAdapter, IDEmbedsNode, AddIdentity, MultiIDAttentionNode]
