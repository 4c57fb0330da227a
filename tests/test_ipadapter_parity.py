"""ComfyUI tier: ID Embeds computes identity tokens as the reference implementations do, on ComfyUI's own CLIP
vision model class (a tiny random one) and IP-Adapter files of every variant in the public key layouts.

The expected tokens are written out here in plain torch: ComfyUI's CLIP preprocessing (antialiased bicubic resize of
the short side to 224, centre crop, 8-bit rounding, CLIP normalisation), the CLIP vision model called on those pixel
values, insightface's own ``face_align.norm_crop`` for FaceID-Plus crops, and IP-Adapter's projections
(tests/ipadapter_reference.py, float64, from the file's raw tensors). Negative images: ``clip mean`` = zero pixel
values after normalisation (tencent-ailab/IP-Adapter ``torch.zeros_like(clip_image)``), ``black`` = a black image
through ComfyUI's preprocessing (cubiq/ComfyUI_IPAdapter_plus ``torch.zeros([1, 224, 224, 3])``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tolerances as tol
import torch
import torch.nn.functional as F
from helpers import run_node
from ipadapter_reference import ref_tokens
from skimage import data as skimage_data

from magic_portrait.tiny_ipadapter import write_tiny_ipadapter

LOAD, EMBEDS = "MagicPortrait_LoadIPAdapter", "MagicPortrait_IDEmbeds"
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])
NEGATIVES = ["clip mean (IP-Adapter)", "black (IPAdapter_plus)"]
VARIANTS = ["base", "plus", "plus-face", "full-face", "faceid", "faceid-portrait", "faceid-plus", "faceid-plusv2"]
NAMES = {"base": "ip-adapter_sd15", "plus": "ip-adapter-plus_sd15", "plus-face": "ip-adapter-plus-face_sd15",
         "full-face": "ip-adapter-full-face_sd15", "faceid": "ip-adapter-faceid_sd15",
         "faceid-portrait": "ip-adapter-faceid-portrait_sd15", "faceid-plus": "ip-adapter-faceid-plus_sd15",
         "faceid-plusv2": "ip-adapter-faceid-plusv2_sd15"}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def clip_vision(tiny, tmp_path_factory):
    return tiny.build_tiny_clip_vision(seed=21, config_dir=tmp_path_factory.mktemp("clip_vision_parity"))


@pytest.fixture(scope="module")
def adapters(comfy, nodes, tmp_path_factory):
    from magic_portrait import comfy_env

    root = tmp_path_factory.mktemp("parity_models")
    for n, variant in enumerate(VARIANTS):
        write_tiny_ipadapter(root / "ipadapter" / f"{NAMES[variant]}.safetensors", variant=variant, family="sd15",
                             layer_inner_dims=[32] * 16, clip_embed_dim=48, clip_hidden_dim=64, seed=30 + n)
    write_tiny_ipadapter(root / "ipadapter" / "ip-adapter-faceid-plusv2_sdxl.safetensors", variant="faceid-plusv2",
                         family="sdxl", layer_inner_dims=[8] * 70, clip_hidden_dim=64, seed=40)
    comfy_env.boot(models_dir=root)
    names = {v: f"{NAMES[v]}.safetensors" for v in VARIANTS} | {"sdxl": "ip-adapter-faceid-plusv2_sdxl.safetensors"}
    return {key: run_node(nodes[LOAD], ipadapter_file=name, variant="auto (from the file)").result[0]
            for key, name in names.items()}


@pytest.fixture(scope="module")
def astronaut():
    return torch.from_numpy(skimage_data.astronaut()).float()[None] / 255.0  # [1, 512, 512, 3]


@pytest.fixture(scope="module")
def astronaut_faces(pack, astronaut):
    """The astronaut's face as dlib finds it, carrying a 512-d ArcFace-kind embedding (what insightface gives)."""
    core = pack.magic_core
    found = core.face_search.find_faces(core.face_backends.DlibAnalyzer("hog"), core.faces.to_rgb_uint8(astronaut[0]))
    face = found.faces[0]
    embedding = np.random.default_rng(3).normal(size=512)
    arcface = core.faces.Face(bbox=face.bbox, kps=face.kps, score=face.score, embedding=embedding,
                              embedding_kind=core.faces.ARCFACE_512, backend="test")
    return core.faces.FaceDetections([[arcface]], [(512, 512)], embedding_kind=core.faces.ARCFACE_512)


# ------------------------------------------------------------------------------------------ written-out reference
def clip_pixels(image: torch.Tensor, size: int = 224) -> torch.Tensor:
    """ComfyUI's CLIP preprocessing written out: [1, H, W, 3] in [0, 1] -> normalised pixel values [1, 3, S, S]."""
    x = image.movedim(-1, 1)
    h, w = x.shape[2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        x = F.interpolate(x, size=(round(scale * h), round(scale * w)), mode="bicubic", antialias=True)
        top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    x = torch.clamp(255.0 * x, 0, 255).round() / 255.0
    return (x - CLIP_MEAN.view(3, 1, 1)) / CLIP_STD.view(3, 1, 1)


def clip_features(clip_vision, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_embeds, penultimate hidden states) of the CLIP vision model itself on given pixel values."""
    with torch.inference_mode():
        out = clip_vision.model(pixel_values=pixel_values.float(), intermediate_output=-2)
    return out[2].float(), out[1].float()


def negative_pixels(kind: str) -> torch.Tensor:
    if kind.startswith("clip mean"):
        return torch.zeros(1, 3, 224, 224)  # IP-Adapter: torch.zeros_like(clip_image)
    return clip_pixels(torch.zeros(1, 224, 224, 3))  # IPAdapter_plus: a black image through the preprocessing


def face_square(image: torch.Tensor, face, margin: float) -> torch.Tensor:
    """The square of side (1 + 2 x margin) x the face box's longer side (whole pixels, rounded up) around the box,
    zero outside the picture."""
    x0, y0, x1, y1 = face.bbox.tolist()
    n = math.ceil(max(x1 - x0, y1 - y0) * (1 + 2 * margin))
    left, top = round((x0 + x1) / 2 - n / 2), round((y0 + y1) / 2 - n / 2)
    padded = F.pad(image.movedim(-1, 1), (n, n, n, n))
    return padded[:, :, top + n:top + 2 * n, left + n:left + 2 * n].movedim(1, -1)


def uint8(image: torch.Tensor) -> np.ndarray:
    return (image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def aligned_crop(core, image: torch.Tensor, face, size: int) -> torch.Tensor:
    """The FaceID-Plus crop: the pack's align_face, which matches insightface's own norm_crop to one 8-bit level
    (test_aligned_crops_match_insightface_norm_crop)."""
    return torch.from_numpy(core.face_align.align_face(uint8(image), face.kps, size)).float()[None] / 255.0


def expected_tokens(adapter, clip_vision, reference: torch.Tensor | None, face, negative: str,
                    shortcut_scale: float = 1.0):
    """(positive, negative) tokens as the original IP-Adapter computes them, float64."""
    pos, neg = {}, {}
    if adapter.needs_clip_embeds or adapter.needs_clip_hidden:
        embeds, hidden = clip_features(clip_vision, clip_pixels(reference))
        pos |= {"clip_embeds": embeds, "clip_hidden": hidden}
        neg |= {"clip_embeds": torch.zeros_like(embeds), "clip_hidden": clip_features(clip_vision,
                                                                                     negative_pixels(negative))[1]}
    if adapter.needs_face_embedding:
        pos["face_embedding"] = torch.from_numpy(face.embedding).float()[None]
        neg["face_embedding"] = torch.zeros(1, 512)
    shortcut = adapter.variant == "faceid-plusv2"
    return (ref_tokens(adapter, pos, shortcut=shortcut, scale=shortcut_scale),
            ref_tokens(adapter, neg, shortcut=shortcut, scale=shortcut_scale))


def token_tol(adapter) -> float:
    # a float32 projection against the float64 formula; CLIP features are the very same computation
    return tol.float_tol(torch.float32, tol.reduction_ops(adapter.projection()) + tol.LOGIT_BOUND)


def id_embeds(nodes, adapter, images, faces, clip_vision, **over):
    inputs = {"ipadapter": adapter, "images": images, "faces": faces, "face_index": 0, "clip_vision": clip_vision,
              "combine": "average", "image_crop": "auto", "face_margin": 0.2, "shortcut_scale": 1.0} | over
    return run_node(nodes[EMBEDS], **inputs).result


# ------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("negative", NEGATIVES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_tokens_of_every_variant_follow_the_original_formulas(pack, nodes, adapters, clip_vision, astronaut,
                                                             astronaut_faces, variant, negative):
    adapter = adapters[variant]
    face = astronaut_faces.faces[0][0]
    if variant in ("faceid-plus", "faceid-plusv2"):
        reference = aligned_crop(pack.magic_core, astronaut, face, 224)  # at 224 px, as IP-Adapter crops it
    elif adapter.needs_clip_embeds or adapter.needs_clip_hidden:
        reference = face_square(astronaut, face, 0.2)  # the face cut out at the picture's resolution
    else:
        reference = None
    embeds, crops = id_embeds(nodes, adapter, astronaut, astronaut_faces, clip_vision, negative_image=negative,
                              shortcut_scale=1.5 if variant == "faceid-plusv2" else 1.0)
    positive, negative_tokens = expected_tokens(adapter, clip_vision, reference, face, negative,
                                                1.5 if variant == "faceid-plusv2" else 1.0)
    bound = token_tol(adapter)
    torch.testing.assert_close(embeds.positive.double(), positive, rtol=0, atol=bound)
    torch.testing.assert_close(embeds.negative.double(), negative_tokens, rtol=0, atol=bound)
    if reference is not None:  # the crops output is what CLIP vision saw
        seen = clip_pixels(reference) * CLIP_STD.view(3, 1, 1) + CLIP_MEAN.view(3, 1, 1)
        torch.testing.assert_close(crops, seen.movedim(1, -1), rtol=0, atol=1e-6)


def test_the_two_negative_images_differ_only_where_a_variant_encodes_one(nodes, adapters, clip_vision, astronaut,
                                                                      astronaut_faces):
    for variant in VARIANTS:
        a, b = (id_embeds(nodes, adapters[variant], astronaut, astronaut_faces, clip_vision, negative_image=n)[0]
                for n in NEGATIVES)
        assert torch.equal(a.positive, b.positive)
        if adapters[variant].needs_clip_hidden:
            assert tol.differs(a.negative, b.negative), variant
        else:  # base: zero image_embeds; FaceID: a zero face embedding, whatever the option
            assert torch.equal(a.negative, b.negative), variant


def test_clip_mean_is_exactly_zero_after_normalisation_not_the_rounded_grey(nodes, adapters, clip_vision):
    grey = CLIP_MEAN.expand(1, 224, 224, 3).clone()
    rounded = clip_pixels(grey)  # ComfyUI rounds the grey to 8 bits: (123, 117, 104) / 255
    assert rounded.abs().max() > 1e-3 and torch.allclose(rounded[0, :, 0, 0],
                                                         torch.tensor([0.00334, 0.00381, -0.00133]), atol=1e-5)
    hidden_zero = clip_features(clip_vision, torch.zeros(1, 3, 224, 224))[1]
    hidden_grey = clip_features(clip_vision, rounded)[1]
    plus = adapters["plus"]
    ours = id_embeds(nodes, plus, torch.rand(1, 64, 64, 3), None, clip_vision, image_crop="whole image")[0]
    zero, grey_tokens = (ref_tokens(plus, {"clip_hidden": h}) for h in (hidden_zero, hidden_grey))
    torch.testing.assert_close(ours.negative.double(), zero, rtol=0, atol=token_tol(plus))
    assert tol.differs(grey_tokens, zero)  # the 8-bit grey would not be IP-Adapter's negative


@pytest.mark.parametrize("shape", [(512, 512), (512, 384), (300, 700)])
def test_a_reference_reaches_clip_at_its_own_size_antialiased(nodes, adapters, clip_vision, astronaut, shape):
    h, w = shape
    image = F.interpolate(astronaut.movedim(-1, 1), size=shape, mode="bilinear", antialias=True).movedim(1, -1)
    for variant in ("plus", "base"):
        adapter = adapters[variant]
        embeds = id_embeds(nodes, adapter, image, None, clip_vision, image_crop="whole image")[0]
        positive, _ = expected_tokens(adapter, clip_vision, image, None, NEGATIVES[0])
        torch.testing.assert_close(embeds.positive.double(), positive, rtol=0, atol=token_tol(adapter))
        # what the pack did before: a 224 px bicubic resize without antialiasing, then the preprocessing
        small = F.interpolate(image.movedim(-1, 1), scale_factor=224 / min(h, w), mode="bicubic",
                              antialias=False).movedim(1, -1).clamp(0, 1)
        old, _ = expected_tokens(adapter, clip_vision, small, None, NEGATIVES[0])
        assert tol.differs(old, positive), variant  # this test tells the two apart


@pytest.mark.parametrize("alignment", ["224 (IP-Adapter)", "256 for SDXL (IPAdapter_plus)"])
def test_faceid_plus_alignment_size_per_family(pack, nodes, adapters, clip_vision, astronaut, astronaut_faces,
                                               alignment):
    face = astronaut_faces.faces[0][0]
    for key in ("faceid-plusv2", "sdxl"):
        adapter = adapters[key]
        size = 256 if (key == "sdxl" and alignment.startswith("256")) else 224
        embeds, crops = id_embeds(nodes, adapter, astronaut, astronaut_faces, clip_vision,
                                  faceid_plus_alignment=alignment)
        positive, negative = expected_tokens(adapter, clip_vision, aligned_crop(pack.magic_core, astronaut, face, size),
                                             face, NEGATIVES[0])
        torch.testing.assert_close(embeds.positive.double(), positive, rtol=0, atol=token_tol(adapter))
        torch.testing.assert_close(embeds.negative.double(), negative, rtol=0, atol=token_tol(adapter))
        assert crops.shape == (1, 224, 224, 3)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # skimage deprecations inside insightface's alignment
@pytest.mark.parametrize("size", [224, 256])
def test_aligned_crops_match_insightface_norm_crop(pack, astronaut, astronaut_faces, size):
    """insightface's norm_crop estimates the similarity transform with scikit-image in float32 (its template and
    keypoints are float32), the pack in float64: the matrices agree to ~1e-6, so a few pixels sit one 8-bit level
    apart, never more."""
    face_align = pytest.importorskip("insightface.utils.face_align")
    face = astronaut_faces.faces[0][0]
    theirs = face_align.norm_crop(uint8(astronaut), landmark=face.kps, image_size=size).astype(int)
    ours = pack.magic_core.face_align.align_face(uint8(astronaut), face.kps, size).astype(int)
    assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 1e-3
