"""Tiny, seeded, randomly initialised SD1.5 / SDXL models built from ComfyUI's own classes, for tests and benchmarks.

Everything here is deterministic: the same seed gives the same weights, conditioning and checkpoint bytes.

- `build_sd15_model` / `build_sdxl_model`: a `ModelPatcher` around `comfy.model_base.BaseModel` / `SDXL` whose UNet keeps
  the attention block structure of the real model ((block, number) positions and, for SDXL, several transformer
  indices per block) with few channels: built in well under a second, ~0.1 s per forward pass on a 32x32 latent.
- `build_sd15_controlnet`: a matching tiny ControlNet, as ControlNetLoader would return it.
- `sd15_cond` / `sdxl_cond`: random CONDITIONING lists in ComfyUI's format, so tests can condition without CLIP.
- `write_tiny_sd15_checkpoint`: a single-file SD1.5 `.safetensors` (UNet + CLIP-L + TAESD-layout VAE) that
  `CheckpointLoaderSimple` loads and detects as SD15.
- `write_tiny_sd15_controlnet`: a ControlNet `.safetensors` for that checkpoint that `ControlNetLoader` loads.
- `init_weights_`: ComfyUI's ops skip weight initialisation; this initialises every parameter from a seed.
- `attention_layout`: {(block, number): transformer depth} of any ComfyUI UNet, and the expected
  `SD15_ATTENTION_BLOCKS` / `SDXL_ATTENTION_BLOCKS`.
- `make_tiny_repcontrolnet` / `write_tiny_repcontrolnet`: a random RepControlNet (file) that fits a tiny model.

ComfyUI must be set up through `magic_portrait.comfy_env.boot()` before any `comfy.*` import (it forces the CPU
device before `comfy.model_management` is imported); the functions here call it when ComfyUI is not imported yet.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

# (block_name, number) of every cross-attention transformer in SD1.5 and SDXL, in ComfyUI's numbering.
SD15_ATTENTION_BLOCKS: tuple[tuple[str, int], ...] = (
    *(("input", n) for n in (1, 2, 4, 5, 7, 8)),
    ("middle", 0),
    *(("output", n) for n in range(3, 12)),
)
SDXL_ATTENTION_BLOCKS: tuple[tuple[str, int], ...] = (
    *(("input", n) for n in (4, 5, 7, 8)),
    ("middle", 0),
    *(("output", n) for n in range(6)),
)

# Tiny SDXL transformer depth per UNet level: 2 where SDXL has 2, 3 where SDXL has 10 (more than one index everywhere).
SDXL_TINY_DEPTH = (0, 2, 3)

SD15_CONTEXT_DIM = 768
SDXL_CONTEXT_DIM = 2048
SDXL_POOLED_DIM = 1280


# ---------------------------------------------------------------------------------------------------------- ComfyUI


def ensure_comfy():
    """Make sure ComfyUI is importable and set up the way `comfy_env.boot()` sets it up (CPU forced first).

    When ComfyUI is already imported (inside a running ComfyUI, or after `boot()`), nothing is done.
    """
    if "comfy.model_management" in sys.modules:
        return None
    from . import comfy_env

    return comfy_env.boot()


# ------------------------------------------------------------------------------------------------------------ init


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


_NORM_TYPES = tuple(
    t
    for t in (
        torch.nn.GroupNorm,
        torch.nn.LayerNorm,
        getattr(torch.nn, "RMSNorm", None),
        torch.nn.modules.batchnorm._NormBase,
        torch.nn.modules.instancenorm._InstanceNorm,
    )
    if t is not None
)


def _is_norm(module: torch.nn.Module, param: torch.Tensor) -> bool:
    # Other norm classes (named *Norm) count too, for their 1-D affine parameters only.
    return isinstance(module, _NORM_TYPES) or (param.ndim <= 1 and type(module).__name__.endswith("Norm"))


def _param_plan(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, str]]:
    """(name, parameter, kind) for every parameter; kind: norm_weight, norm_bias, matrix, vector or scalar."""
    owner: dict[str, torch.nn.Module] = {}
    for mod_name, mod in module.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            owner[f"{mod_name}.{p_name}" if mod_name else p_name] = mod
    plan = []
    for name, param in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if _is_norm(owner[name], param):
            kind = "norm_bias" if leaf == "bias" else "norm_weight"
        elif param.ndim >= 2:
            kind = "matrix"
        elif param.ndim == 1:
            kind = "vector"
        else:
            kind = "scalar"
        plan.append((name, param, kind))
    return plan


def _init_value(kind: str, shape: torch.Size, seed: int, name: str) -> torch.Tensor | None:
    """The float32 initial value of one parameter (None: keep the constructor's value)."""
    if kind == "norm_weight":
        return torch.ones(shape)
    if kind == "norm_bias":
        return torch.zeros(shape)
    if kind == "scalar":
        return None
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    value = torch.randn(shape, generator=gen)
    if kind == "matrix":
        fan_in = max(1, value[0].numel())
        return value.mul_(fan_in**-0.5)
    return value.mul_(0.02)


@torch.no_grad()
def init_weights_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Initialise every parameter of `module` in place, deterministically from `seed`; returns `module`.

    Weight matrices, conv kernels and embeddings: N(0, 1/fan_in) (std = fan_in**-0.5, fan_in = numel / out dim);
    norm layers (GroupNorm, LayerNorm, RMSNorm, ...): weight 1, bias 0; every other 1-D parameter (biases): N(0, 0.02).
    The zero-initialised output convs / proj_out layers get random weights too, so outputs depend on their inputs.
    0-dim learned scalars (e.g. CLIP's logit_scale, TAESD's vae_scale) keep their constructor values.
    Each tensor is drawn from its own generator seeded by (seed, parameter name), so it does not depend on the
    other parameters or on the device.
    """
    for name, param, kind in _param_plan(module):
        value = _init_value(kind, param.shape, seed, name)
        if value is None:
            if not torch.isfinite(param).all():
                raise ValueError(f"scalar parameter {name} is not initialised and has no init rule")
            continue
        param.copy_(value.to(device=param.device, dtype=param.dtype))
    return module


# ------------------------------------------------------------------------------------------------------ UNet config


def _unet_config(
    *,
    model_channels: int,
    channel_mult: list[int],
    num_res_blocks: int,
    attention_depth: list[int],
    middle_depth: int,
    context_dim: int,
    use_linear_in_transformer: bool,
    adm_in_channels: int | None,
) -> dict:
    """A UNet config in the form `comfy.model_detection.detect_unet_config` produces for a state dict.

    attention_depth: transformer depth per level (0 = no attention at that level).
    """
    levels = len(channel_mult)
    if len(attention_depth) != levels:
        raise ValueError("attention_depth needs one entry per level of channel_mult")
    transformer_depth = [d for d in attention_depth for _ in range(num_res_blocks)]
    # Output blocks run from the deepest level up, num_res_blocks + 1 per level; UNetModel pops this list from the end.
    per_output_block = [d for d in reversed(attention_depth) for _ in range(num_res_blocks + 1)]
    config = {
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": adm_in_channels,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": model_channels,
        "num_res_blocks": [num_res_blocks] * levels,
        "transformer_depth": transformer_depth,
        "transformer_depth_output": per_output_block[::-1],
        "channel_mult": list(channel_mult),
        "transformer_depth_middle": middle_depth,
        "use_linear_in_transformer": use_linear_in_transformer,
        "context_dim": context_dim,
        "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }
    if adm_in_channels is not None:
        config["num_classes"] = "sequential"
    return config


def _sd15_unet_config(model_channels: int, full_blocks: bool, channel_mult=None) -> dict:
    if full_blocks:
        mult = list(channel_mult or [1, 1, 1, 1])
        if len(mult) != 4:
            raise ValueError("full_blocks needs 4 levels (SD1.5's block numbering)")
        return _unet_config(
            model_channels=model_channels,
            channel_mult=mult,
            num_res_blocks=2,
            attention_depth=[1, 1, 1, 0],
            middle_depth=1,
            context_dim=SD15_CONTEXT_DIM,
            use_linear_in_transformer=False,
            adm_in_channels=None,
        )
    mult = list(channel_mult or [1, 1])
    return _unet_config(
        model_channels=model_channels,
        channel_mult=mult,
        num_res_blocks=1,
        attention_depth=[1] * len(mult),
        middle_depth=1,
        context_dim=SD15_CONTEXT_DIM,
        use_linear_in_transformer=False,
        adm_in_channels=None,
    )


def _check_channels(model_channels: int) -> None:
    if model_channels % 32 or model_channels < 64:
        raise ValueError(
            f"model_channels={model_channels}: use a multiple of 32, at least 64. ComfyUI's UNet normalises with "
            "GroupNorm(32); at 32 channels every group is one channel, which cancels the per-channel timestep "
            "embedding, and the model would not depend on sigma."
        )


def _patcher(model):
    import comfy.model_management
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def _build(config_cls, model_cls, unet_config: dict, model_type, seed: int, heads: dict):
    """heads: {"num_heads": n, "num_head_channels": -1} or {"num_heads": -1, "num_head_channels": c}."""
    import comfy.model_management

    model_config = config_cls(unet_config)
    model_config.unet_config.update(heads)  # after the config class applied its own unet_extra_config
    model_config.set_inference_dtype(torch.float32, None)
    device = comfy.model_management.unet_offload_device()
    model = model_cls(model_config, model_type=model_type, device=device)
    init_weights_(model, seed)
    model.eval()
    return _patcher(model)


def build_sd15_model(
    seed: int = 0,
    *,
    full_blocks: bool = True,
    model_channels: int = 64,
    channel_mult: list[int] | None = None,
    num_heads: int = 2,
    v_prediction: bool = False,
):
    """A tiny SD1.5-architecture model (`comfy.model_base.BaseModel`, `supported_models.SD15` config) as a ModelPatcher.

    full_blocks=True keeps SD1.5's block structure exactly: 4 levels (channel_mult [1, 1, 1, 1] unless given),
    2 res blocks per level, one cross-attention transformer at input 1,2,4,5,7,8, middle 0 and output 3..11
    (`SD15_ATTENTION_BLOCKS`), context_dim 768, conv proj_in/proj_out (use_linear_in_transformer False).
    num_heads: SD1.5 has 8; the default 2 keeps heads meaningful while ComfyUI's CPU attention (sub-quadratic,
    cost ~ heads x tokens^2) stays fast at 4096 tokens.
    full_blocks=False: 2 levels, 1 res block each, attention at input 1,3 / middle 0 / output 0..3 (faster, but
    layer presets naming SD1.5 positions miss it).
    model_channels: a multiple of 32 and at least 64 (at 32, GroupNorm(32) would cancel the timestep embedding).
    Defaults: ~5.7 M parameters, built in ~0.2 s; one forward pass on CPU (one thread) ~0.1 s on a 1x4x32x32
    latent, ~0.5-1 s on 1x4x64x64 with ComfyUI's default CPU attention (sub-quadratic; ~0.15 s with
    --use-pytorch-cross-attention).
    """
    ensure_comfy()
    import comfy.model_base
    import comfy.supported_models

    _check_channels(model_channels)
    if model_channels % num_heads:
        raise ValueError("model_channels must be a multiple of num_heads")
    model_type = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
    unet_config = _sd15_unet_config(model_channels, full_blocks, channel_mult)
    heads = {"num_heads": num_heads, "num_head_channels": -1}
    return _build(comfy.supported_models.SD15, comfy.model_base.BaseModel, unet_config, model_type, seed, heads)


def build_sd15_controlnet(
    seed: int = 0,
    *,
    full_blocks: bool = True,
    model_channels: int = 64,
    channel_mult: list[int] | None = None,
    num_heads: int = 2,
    hint_channels: int = 3,
):
    """A tiny ControlNet for `build_sd15_model(...)` called with the same structure arguments: ComfyUI's
    `comfy.controlnet.ControlNet` around `comfy.cldm.cldm.ControlNet`, the object ControlNetLoader returns, so
    ControlNetApply / ControlNetApplyAdvanced and the sampling path use it as they would a real one.

    Its zero convolutions are random like everything else (`init_weights_`), so the control changes the output.
    The hint image is in pixels (8x the latent size), `hint_channels` channels.
    """
    ensure_comfy()
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.ops
    import comfy.supported_models

    _check_channels(model_channels)
    config = _sd15_unet_config(model_channels, full_blocks, channel_mult)
    config.update(comfy.supported_models.SD15.unet_extra_config)
    config.update({"num_heads": num_heads, "num_head_channels": -1})
    config.pop("out_channels")
    control_model = comfy.cldm.cldm.ControlNet(
        **config,
        hint_channels=hint_channels,
        dtype=torch.float32,
        device=comfy.model_management.unet_offload_device(),
        operations=comfy.ops.disable_weight_init,
    )
    init_weights_(control_model, seed)
    control_model.eval()
    return comfy.controlnet.ControlNet(
        control_model, load_device=comfy.model_management.get_torch_device(), manual_cast_dtype=None
    )


def build_sdxl_model(
    seed: int = 0,
    *,
    model_channels: int = 64,
    channel_mult: tuple[int, int, int] = (1, 2, 2),
    transformer_depth: tuple[int, int, int] = SDXL_TINY_DEPTH,
    middle_depth: int | None = None,
    num_head_channels: int = 32,
    v_prediction: bool = False,
):
    """A tiny SDXL-architecture model (`comfy.model_base.SDXL`, `supported_models.SDXL` config) as a ModelPatcher.

    SDXL's block structure: 3 levels, 2 res blocks each, attention at input 4,5,7,8 / middle 0 / output 0..5
    (`SDXL_ATTENTION_BLOCKS`) with several transformer indices per block (default depth 2 where SDXL has 2 and 3
    where SDXL has 10; middle = the deepest level's depth), context_dim 2048, adm_in_channels 2816 (pooled 1280 +
    6 size embeddings), linear proj_in/proj_out. Heads have `num_head_channels` channels (SDXL: 64).
    Defaults: channels 64 / 128 / 128, 4 heads of 32 in the attention levels, ~30 M parameters (most of them in the
    2048-wide to_k / to_v), built in < 1 s. Condition it with `sdxl_cond` (pooled_output and size conds) through
    ComfyUI's sampling path, or call the UNet with `y=model.model.encode_adm(**cond[0][1])`.
    """
    ensure_comfy()
    import comfy.model_base
    import comfy.supported_models

    _check_channels(model_channels)
    depth = list(transformer_depth)
    unet_config = _unet_config(
        model_channels=model_channels,
        channel_mult=list(channel_mult),
        num_res_blocks=2,
        attention_depth=depth,
        middle_depth=depth[-1] if middle_depth is None else middle_depth,
        context_dim=SDXL_CONTEXT_DIM,
        use_linear_in_transformer=True,
        adm_in_channels=SDXL_POOLED_DIM + 6 * 256,
    )
    model_type = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
    heads = {"num_heads": -1, "num_head_channels": num_head_channels}
    return _build(comfy.supported_models.SDXL, comfy.model_base.SDXL, unet_config, model_type, seed, heads)


def attention_layout(model) -> dict[tuple[str, int], int]:
    """{(block_name, number): transformer depth} of every spatial transformer in a UNet (ModelPatcher or BaseModel),
    in ComfyUI's numbering (the keys `set_model_attn1/attn2_replace` take)."""
    base = getattr(model, "model", model)
    unet = getattr(base, "diffusion_model", base)

    def depth(block) -> int:
        return sum(len(layer.transformer_blocks) for layer in block if hasattr(layer, "transformer_blocks"))

    layout = {}
    for name, blocks in (("input", unet.input_blocks), ("output", unet.output_blocks)):
        for number, block in enumerate(blocks):
            if depth(block):
                layout[(name, number)] = depth(block)
    if depth(unet.middle_block):
        layout[("middle", 0)] = depth(unet.middle_block)
    return layout


# ----------------------------------------------------------------------------------------------------- conditioning


def _randn(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen)


def sd15_cond(seed: int, batch: int = 1, tokens: int = 77) -> list:
    """Random, seeded SD1.5 CONDITIONING: `[[context [B, tokens, 768], {"pooled_output": [B, 768]}]]`
    (the shape CLIPTextEncode gives; SD1.5's UNet ignores pooled_output)."""
    gen = torch.Generator().manual_seed(int(seed))
    context = _randn((batch, tokens, SD15_CONTEXT_DIM), gen)
    pooled = _randn((batch, SD15_CONTEXT_DIM), gen)
    return [[context, {"pooled_output": pooled}]]


def sdxl_cond(
    seed: int,
    batch: int = 1,
    width: int = 1024,
    height: int = 1024,
    tokens: int = 77,
    crop_w: int = 0,
    crop_h: int = 0,
    target_width: int | None = None,
    target_height: int | None = None,
) -> list:
    """Random, seeded SDXL CONDITIONING as CLIPTextEncodeSDXL gives it: `[[context [B, tokens, 2048],
    {"pooled_output": [B, 1280], "width", "height", "crop_w", "crop_h", "target_width", "target_height"}]]`."""
    gen = torch.Generator().manual_seed(int(seed))
    context = _randn((batch, tokens, SDXL_CONTEXT_DIM), gen)
    pooled = _randn((batch, SDXL_POOLED_DIM), gen)
    return [
        [
            context,
            {
                "pooled_output": pooled,
                "width": int(width),
                "height": int(height),
                "crop_w": int(crop_w),
                "crop_h": int(crop_h),
                "target_width": int(width if target_width is None else target_width),
                "target_height": int(height if target_height is None else target_height),
            },
        ]
    ]


# ------------------------------------------------------------------------------------------------------- checkpoint

_CHECKPOINT_FORMAT = "1"


def _random_state_dict(
    module: torch.nn.Module, seed: int, prefix: str, dtype: torch.dtype, *, seed_prefix: str, skip=()
) -> dict:
    """The state dict `init_weights_` gives `module` (parameters named `seed_prefix + name` for seeding), cast to
    `dtype`, keys `prefix + name`, without touching `module`, which may live on the meta device.
    Scalars take the module's value; parameter names in `skip` are left out."""
    out = {}
    for name, param, kind in _param_plan(module):
        if name in skip:
            continue
        value = _init_value(kind, param.shape, seed, seed_prefix + name)
        if value is None:
            if param.is_meta:
                raise ValueError(f"scalar parameter {name} has no value on the meta device")
            value = param.detach().float().cpu()
        out[prefix + name] = value.to(dtype).contiguous()
    return out


def _checkpoint_metadata(seed: int, full_blocks: bool, dtype: torch.dtype) -> dict[str, str]:
    return {
        "magic_portrait.tiny": "sd15",
        "magic_portrait.tiny.format": _CHECKPOINT_FORMAT,
        "seed": str(int(seed)),
        "full_blocks": str(bool(full_blocks)),
        "dtype": str(dtype).removeprefix("torch."),
    }


def _existing_metadata(path: Path) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata()
    except Exception:  # unreadable or partial file: write it again
        return None


def _save_atomically(state: dict, path: Path, metadata: dict) -> Path:
    """Save a state dict as safetensors through a temporary file, so a killed write never leaves a partial file."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def write_tiny_sd15_checkpoint(
    path,
    seed: int = 0,
    *,
    full_blocks: bool = True,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = True,
) -> Path:
    """Write a random, seeded single-file SD1.5 checkpoint (`.safetensors`) that ComfyUI's CheckpointLoaderSimple
    (`comfy.sd.load_checkpoint_guess_config`) loads and detects as SD15; returns the path.

    Layout (what ComfyUI reads from an SD1.5 single file):
    - `model.diffusion_model.*`: the UNet. model_channels 320 and context_dim 768, as SD15 detection requires;
      full_blocks=True: channel_mult [1, 1, 1, 1], 2 res blocks per level, 8 heads: SD1.5's 16 attention layers at
      their (block, number) positions (~112 M parameters); full_blocks=False: 2 levels, 1 res block (~44 M).
      Its weights are those of `build_sd15_model(seed, model_channels=320, full_blocks=...)`, rounded to `dtype`.
    - `cond_stage_model.transformer.text_model.*`: CLIP-L (fixed size, 123 M parameters), so CLIPTextEncode works.
      `text_projection` / `logit_scale` are not in SD1.5 files and ComfyUI does not expect them.
    - `first_stage_model.taesd_encoder.* / taesd_decoder.* / vae_scale / vae_shift`: a TAESD-layout VAE (2.4 M
      parameters), which ComfyUI's VAE detection accepts; the KL VAE would add 84 M.
    Every weight follows `init_weights_` with this seed. fp16: ~452 MiB with full_blocks, ~324 MiB without.
    overwrite=False keeps an existing file written by this function with the same seed, layout and dtype.
    """
    ensure_comfy()
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd

    path = Path(path)
    metadata = _checkpoint_metadata(seed, full_blocks, dtype)
    if not overwrite and path.is_file() and _existing_metadata(path) == metadata:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = torch.device("meta")

    unet_config = dict(_sd15_unet_config(320, full_blocks))
    unet_config.update(comfy.supported_models.SD15.unet_extra_config)  # 8 heads, as detection will configure it
    unet = openaimodel.UNetModel(**unet_config, device=meta, operations=comfy.ops.disable_weight_init)
    clip = comfy.sd1_clip.SDClipModel(device=meta, dtype=torch.float32)
    taesd = comfy.taesd.taesd.TAESD()  # small; built for real because it has learned scalars (vae_scale/shift)

    state = {}
    state.update(_random_state_dict(unet, seed, "model.diffusion_model.", dtype, seed_prefix="diffusion_model."))
    state.update(
        _random_state_dict(
            clip,
            seed,
            "cond_stage_model.",
            dtype,
            seed_prefix="cond_stage_model.",
            skip={"transformer.text_projection.weight", "logit_scale"},
        )
    )
    state.update(_random_state_dict(taesd, seed, "first_stage_model.", dtype, seed_prefix="first_stage_model."))
    del unet, clip, taesd

    return _save_atomically(state, path, metadata)


def write_tiny_sd15_controlnet(path, seed: int = 0, *, dtype: torch.dtype = torch.float16, hint_channels: int = 3,
                               overwrite: bool = True) -> Path:
    """Write a random, seeded SD1.5 ControlNet (`.safetensors`, the original `control_model`-less key layout:
    `input_blocks.*`, `zero_convs.*`, `input_hint_block.*`, `middle_block_out.*`) that ComfyUI's ControlNetLoader
    loads and detects as SD15, with the block structure of `write_tiny_sd15_checkpoint(full_blocks=True)`
    (model_channels 320, channel_mult [1, 1, 1, 1], 8 heads): ~48 M parameters, ~91 MiB in fp16.
    Its zero convolutions are random like every weight, so the control changes the output (noise, like the
    checkpoint's)."""
    ensure_comfy()
    import comfy.cldm.cldm
    import comfy.ops
    import comfy.supported_models

    path = Path(path)
    metadata = {"magic_portrait.tiny": "sd15-controlnet", "magic_portrait.tiny.format": _CHECKPOINT_FORMAT,
                "seed": str(int(seed)), "dtype": str(dtype).removeprefix("torch."), "hint_channels": str(hint_channels)}
    if not overwrite and path.is_file() and _existing_metadata(path) == metadata:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    config = dict(_sd15_unet_config(320, True))
    config.update(comfy.supported_models.SD15.unet_extra_config)
    config.pop("out_channels")
    control = comfy.cldm.cldm.ControlNet(**config, hint_channels=hint_channels, device=torch.device("meta"),
                                         operations=comfy.ops.disable_weight_init)
    state = _random_state_dict(control, seed, "", dtype, seed_prefix="control_model.")
    del control
    return _save_atomically(state, path, metadata)


# ------------------------------------------------------------------------------------------------------ CLIP vision
TINY_CLIP_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 3,
                    "projection_dim": 48}


def clip_vision_config(**overrides) -> dict:
    """A CLIP vision config in ComfyUI's JSON form: ViT-*/14 at 224 px (257 tokens) with tiny widths by default."""
    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "image_size": 224,
              "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-05,
              "model_type": "clip_vision_model", "num_channels": 3, "patch_size": 14, "torch_dtype": "float32",
              **TINY_CLIP_VISION}
    config.update(overrides)
    return config


def build_tiny_clip_vision(seed: int = 0, config_dir=None, **overrides):
    """A tiny random CLIP vision model as ComfyUI's `comfy.clip_vision.ClipVisionModel` (what CLIPVisionLoader
    returns): encode_image gives image_embeds [B, projection_dim] and penultimate_hidden_states [B, 257, hidden].
    ComfyUI builds it from a JSON config file, written to `config_dir` (a temporary folder by default)."""
    import json
    import tempfile

    ensure_comfy()
    import comfy.clip_vision

    folder = Path(config_dir or tempfile.mkdtemp(prefix="magic_tiny_clip_vision_"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny_clip_vision.json"
    path.write_text(json.dumps(clip_vision_config(**overrides)))
    model = comfy.clip_vision.ClipVisionModel(str(path))
    init_weights_(model.model, seed)
    return model


def write_clip_vision_vitl(path, seed: int = 0, *, dtype: torch.dtype = torch.float16, overwrite: bool = True) -> Path:
    """A random CLIP vision file in ViT-L/14's layout (24 layers of 1024, 303 M parameters, ~580 MiB in fp16): the
    smallest layout ComfyUI's CLIPVisionLoader recognises (it tells models apart by their layer count), for smoke
    runs of workflows that load a CLIP vision model. Its outputs are noise: hidden size 1024, image_embeds 768."""
    ensure_comfy()
    import comfy.clip_model
    import comfy.ops

    path = Path(path)
    metadata = {"magic_portrait.tiny": "clip-vision-vitl", "magic_portrait.tiny.format": _CHECKPOINT_FORMAT,
                "seed": str(int(seed)), "dtype": str(dtype).removeprefix("torch.")}
    if not overwrite and path.is_file() and _existing_metadata(path) == metadata:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    config = clip_vision_config(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                num_hidden_layers=24, projection_dim=768)
    model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, torch.device("meta"),
                                                       comfy.ops.disable_weight_init)
    state = _random_state_dict(model, seed, "", dtype, seed_prefix="clip_vision.")
    del model
    return _save_atomically(state, path, metadata)


def build_sd_vae(seed: int = 0):
    """A random VAE in SD1.5's KL layout (84 M parameters: the real size, for benchmarks) as ComfyUI's
    `comfy.sd.VAE`, which detects it from the state dict as it would a real SD1.5 VAE."""
    ensure_comfy()
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    module = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    init_weights_(module, seed)
    return comfy.sd.VAE(sd=module.state_dict())


# ---------------------------------------------------------------------------------------------------- RepControlNet


def _unet_state_from(base) -> dict[str, torch.Tensor]:
    """UNet tensors (no prefix) from a checkpoint path (.safetensors), a state dict, or a ComfyUI ModelPatcher /
    BaseModel (anything with ``.model.diffusion_model`` or ``.diffusion_model``)."""
    from magic_core.repcontrolnet import UNET_PREFIXES, strip_unet_prefix

    if isinstance(base, (str, Path)):
        from safetensors import safe_open

        out = {}
        with safe_open(str(base), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                prefix = next((p for p in UNET_PREFIXES if key.startswith(p)), None)
                if prefix is not None:
                    out[key[len(prefix):]] = f.get_tensor(key)
        if not out:
            raise ValueError(f"'{base}' holds no UNet tensors (model.diffusion_model.*)")
        return out
    if isinstance(base, dict):
        return {strip_unet_prefix(k): v for k, v in base.items()}
    unet = getattr(getattr(base, "model", base), "diffusion_model", None)
    if unet is None:
        raise ValueError(f"cannot read UNet weights from a {type(base).__name__}")
    return {k: v.detach() for k, v in unet.state_dict().items()}


def make_tiny_repcontrolnet(base, seed: int = 0, *, preset: str = "encoder", model_family: str = "sd15",
                            condition_type: str = "landmarks", alpha: float = 0.5, beta: float = 0.5,
                            hidden_channels: int = 32, num_layers: int = 1, modal_noise: float = 0.1,
                            dtype: torch.dtype = torch.float32):
    """A random (untrained) RepControlNet that fits `base` (see `_unet_state_from`) and visibly changes it: modal
    weights = base weights plus `modal_noise` relative Gaussian noise, and an adapter whose zero output conv is
    re-drawn (seeded). For tests, benchmarks and smoke runs of workflows; its control means nothing."""
    from magic_core.repcontrolnet import default_layer_keys, init_weights_from_base

    state = _unet_state_from(base)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    layers = default_layer_keys(shapes, model_family, preset)
    weights = init_weights_from_base(
        {k: state[k] for layer in layers for k in (layer + ".weight", layer + ".bias") if k in state},
        layers,
        adapter_config={"out_channels": int(shapes["input_blocks.0.0.weight"][0]),
                        "hidden_channels": hidden_channels, "num_layers": num_layers},
        alpha=alpha, beta=beta, seed=seed, model_family=model_family, condition_type=condition_type,
    )
    gen = torch.Generator().manual_seed(int(seed) + 1)
    for key, t in weights.modal.items():
        scale = (float(t.float().std()) if t.numel() > 1 else 0.0) or 0.02
        noise = torch.randn(t.shape, generator=gen) * (modal_noise * scale)
        weights.modal[key] = (t.float() + noise).to(dtype).contiguous()
    adapter = weights.adapter_state
    adapter["conv_out.weight"] = torch.randn(adapter["conv_out.weight"].shape, generator=gen) * (
        adapter["conv_out.weight"][0].numel() ** -0.5)
    adapter["conv_out.bias"] = torch.randn(adapter["conv_out.bias"].shape, generator=gen) * 0.02
    weights.metadata["magic_portrait.tiny"] = "random RepControlNet for tests; its control means nothing"
    return weights


def write_tiny_repcontrolnet(path, checkpoint_or_model, seed: int = 0, **kwargs) -> Path:
    """Write `make_tiny_repcontrolnet(checkpoint_or_model, seed, **kwargs)` to `path` (parent folders created).
    Modal weights are stored as float16 unless `dtype` is given (the tiny SD1.5 checkpoint's encoder is ~30 M
    parameters). Returns the path."""
    from magic_core.repcontrolnet import save_repcontrolnet

    kwargs.setdefault("dtype", torch.float16)
    weights = make_tiny_repcontrolnet(checkpoint_or_model, seed, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_repcontrolnet(path, weights)
    return path
