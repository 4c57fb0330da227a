"""What ID Embeds shows CLIP vision: reference images and face crops at their own size through ComfyUI's own CLIP
preprocessing (as core CLIPVisionEncode does: antialiased bicubic resize of the short side, centre crop, 8-bit
rounding, normalisation), and the negative image of either reference implementation.

- Whole references go to ``ClipVisionModel.encode_image(image, crop=True)`` as they are.
- Face crops (plus-face, base or plus on the face) are cut out of the float IMAGE at its own resolution (zero outside
  the picture) and left to that same preprocessing: never resized beforehand without antialiasing.
- FaceID-Plus crops are aligned to insightface's ArcFace template (``face_align.align_face``, insightface's
  ``norm_crop``) at 224 px, what IP-Adapter trained and runs with, or at 256 px for SDXL as IPAdapter_plus does
  (ComfyUI's preprocessing then resizes it to 224).
- The negative image: ``clip mean`` is the original IP-Adapter's ``torch.zeros_like(clip_image)``: zero *after*
  normalisation, i.e. every pixel at CLIP's mean colour. It is fed to the vision model as zero pixel values directly,
  since ComfyUI's preprocessing rounds pixels to 8 bits and the CLIP-mean grey would then normalise to (0.0033,
  0.0038, -0.0013), not 0. ``black`` is what IPAdapter_plus encodes: ``torch.zeros([1, 224, 224, 3])`` through
  ComfyUI's preprocessing, i.e. -mean/std in normalised space.
"""

from __future__ import annotations

import comfy.clip_model
import comfy.model_management
import torch

from ..magic_core import face_align
from ..magic_core import face_crop as crop
from ..magic_core import faces as fc

NEGATIVE_CLIP_MEAN = "clip mean (IP-Adapter)"
NEGATIVE_BLACK = "black (IPAdapter_plus)"
NEGATIVE_CHOICES = [NEGATIVE_CLIP_MEAN, NEGATIVE_BLACK]
ALIGN_ORIGINAL = "224 (IP-Adapter)"
ALIGN_IPADAPTER_PLUS = "256 for SDXL (IPAdapter_plus)"
ALIGN_CHOICES = [ALIGN_ORIGINAL, ALIGN_IPADAPTER_PLUS]


def face_box_crop(image: torch.Tensor, face: fc.Face, margin: float) -> torch.Tensor:
    """[1, S, S, 3]: the pack's face square (``face_crop.face_square``: `margin` face sizes of room on each side) cut
    from the float IMAGE [H, W, C] at its own resolution; black where it reaches past the picture."""
    pixels = image[..., :3].detach().float().cpu().numpy()
    return torch.from_numpy(crop.cut_square(pixels, crop.face_square(face, margin), outside="zeros"))[None]


def align_size(choice: str, family: str) -> int:
    """The FaceID-Plus alignment crop size for an option and a model family."""
    return 256 if choice == ALIGN_IPADAPTER_PLUS and family == "sdxl" else 224


def aligned_face(image: torch.Tensor, face: fc.Face, size: int) -> torch.Tensor:
    """[1, size, size, 3]: the face aligned to the ArcFace template (insightface's norm_crop on the 8-bit picture)."""
    crop = face_align.align_face(fc.to_rgb_uint8(image), face.kps, size)
    return torch.from_numpy(crop).float().div(255.0)[None]


def _hidden_states(clip_vision, out) -> torch.Tensor:
    """The penultimate hidden states of a vision-model output, as ClipVisionModel.encode_image reads them."""
    hidden = out[1].to(comfy.model_management.intermediate_device())
    return hidden[:, -2] if getattr(clip_vision, "return_all_hidden_states", False) else hidden


def encode(clip_vision, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_embeds [N, D], penultimate hidden states [N, T, D]) of N images, each [1, H, W, 3] at its own size,
    through ``encode_image(crop=True)`` exactly as core CLIPVisionEncode (crop "center") encodes them."""
    embeds, hidden = [], []
    for image in images:
        out = clip_vision.encode_image(image, crop=True)
        embeds.append(out["image_embeds"])
        hidden.append(out["penultimate_hidden_states"])
    return torch.cat(embeds), torch.cat(hidden)


def negative_hidden(clip_vision, kind: str) -> torch.Tensor:
    """[1, T, D]: the penultimate hidden states of the negative image (module docstring)."""
    size = int(getattr(clip_vision, "image_size", 224))
    if kind == NEGATIVE_BLACK:
        return clip_vision.encode_image(torch.zeros(1, size, size, 3), crop=True)["penultimate_hidden_states"]
    if kind != NEGATIVE_CLIP_MEAN:
        raise ValueError(f"negative image {kind!r}: choose one of {', '.join(NEGATIVE_CHOICES)}")
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    pixel_values = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    out = clip_vision.model(pixel_values=pixel_values,
                            intermediate_output="all" if getattr(clip_vision, "return_all_hidden_states", False)
                            else -2)
    return _hidden_states(clip_vision, out)


def what_clip_sees(clip_vision, images: list[torch.Tensor]) -> torch.Tensor:
    """IMAGE [N, S, S, 3]: each image as CLIP vision receives it (resized, centre-cropped, rounded), before the
    normalisation: ComfyUI's own preprocessing with mean 0 and std 1."""
    size = int(getattr(clip_vision, "image_size", 224))
    seen = [comfy.clip_model.clip_preprocess(image.float(), size=size, mean=[0.0] * 3, std=[1.0] * 3, crop=True)
            for image in images]
    return torch.cat(seen).movedim(1, -1).clamp(0.0, 1.0)
