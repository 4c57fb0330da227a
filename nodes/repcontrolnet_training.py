"""ComfyUI side of RepControlNet training, shared by the Train RepControlNet node and ``python -m magic_portrait train``.

- ``TrainingUNet``: the ModelPatcher's UNet as the loop in magic_core.repcontrolnet_train needs it. For the length of
  a run (a context) it puts the merged tensors of each step into the trained layers, plain copies in place of
  tensors the executor created under inference mode (those cannot be saved for backward), and, with gradient
  checkpointing, runs every ResBlock and SpatialTransformer under ``torch.utils.checkpoint`` (non-reentrant, as
  core's TrainLoraNode does), so the recomputation in the backward pass sees the same merged tensors. Everything is
  put back when the run ends, also on error or interrupt.
- ``BatchPreparer``: encodes image samples with the VAE (one image at a time, so the result never depends on how
  samples were batched; small fixed sets are encoded once, before training), brings latents into the model's space
  (``latent_format.process_in``) and builds the text context: the sample's own conditioning (core training
  datasets) or the prompt's.
- ``run_training``: the whole run on a loaded MODEL + VAE + CONDITIONING.
"""

from __future__ import annotations

import time

import comfy.model_management
import comfy.utils
import torch

from ..magic_core import repcontrolnet as rcn
from ..magic_core import repcontrolnet_train as rcn_train
from .common import model_family

CHECKPOINTED_BLOCKS = ("ResBlock", "SpatialTransformer", "SpatialVideoTransformer", "VideoResBlock")
LATENT_CACHE_SAMPLES = 4096  # fixed image sets up to this size are VAE-encoded once per sample


def _module_and_name(root: torch.nn.Module, key: str) -> tuple[torch.nn.Module, str]:
    path, _, name = key.rpartition(".")
    return (root.get_submodule(path) if path else root), name


class TrainingUNet:
    """``unet_forward(merged, x_noisy, sigma, context, features) -> denoised`` on a ModelPatcher's UNet; use as a
    context manager around the training run (``with TrainingUNet(model) as forward: ...``)."""

    def __init__(self, model, *, gradient_checkpointing: bool = False):
        self.base = model.model
        self.unet = self.base.diffusion_model
        self.sampling = self.base.model_sampling
        self.gradient_checkpointing = gradient_checkpointing
        self._saved: dict[tuple[int, str], tuple[torch.nn.Module, str, dict, object]] = {}
        self._patched: list[tuple[torch.nn.Module, object]] = []
        self._active = False

    # --------------------------------------------------------------------------------------------- the context

    def __enter__(self) -> TrainingUNet:
        if self._active:
            raise RuntimeError("this TrainingUNet is already in use")
        self._active = True
        try:
            for module in self.unet.modules():
                for table in (module._parameters, module._buffers):
                    for name, value in list(table.items()):
                        if value is not None and value.is_inference():
                            copy = value.clone()
                            if isinstance(value, torch.nn.Parameter):
                                copy = torch.nn.Parameter(copy, requires_grad=False)
                            self._replace(module, table, name, copy)
            if self.gradient_checkpointing:
                for module in self.unet.modules():
                    if type(module).__name__ in CHECKPOINTED_BLOCKS:
                        self._checkpoint(module)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for module, previous in reversed(self._patched):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._patched.clear()
        for _module, name, table, original in self._saved.values():
            table[name] = original
        self._saved.clear()
        self._active = False

    def _replace(self, module, table: dict, name: str, value) -> None:
        key = (id(module), name)
        if key not in self._saved:
            self._saved[key] = (module, name, table, table[name])
        table[name] = value

    def _checkpoint(self, module: torch.nn.Module) -> None:
        previous = module.__dict__.get("forward")
        original = module.forward

        def forward(*args, **kwargs):
            # the UNet keeps changing transformer_options after a block returns: recompute with its state of now
            args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
            kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            if not torch.is_grad_enabled():
                return original(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(original, *args, use_reentrant=False, **kwargs)

        module.forward = forward
        self._patched.append((module, previous))

    # ----------------------------------------------------------------------------------------------- forward

    def install(self, merged: dict[str, torch.Tensor]) -> None:
        """Put this step's merged tensors into their layers (they stay until the next step's replace them)."""
        for key, tensor in merged.items():
            module, name = _module_and_name(self.unet, key)
            table = module._parameters if name in module._parameters else module._buffers
            if name not in table:
                raise KeyError(f"the UNet has no tensor '{key}'")
            self._replace(module, table, name, tensor)

    def __call__(self, merged, x_noisy, sigma, context, features) -> torch.Tensor:
        if not self._active:
            raise RuntimeError("use TrainingUNet inside its context (with TrainingUNet(model) as forward: ...)")
        self.install(merged)
        xc = self.sampling.calculate_input(sigma, x_noisy)
        t = self.sampling.timestep(sigma).float()

        def add(h, opts):
            return rcn.add_features(h, features) if opts.get("block") == ("input", 0) else h

        kwargs = {"context": context["context"], "transformer_options": {"patches": {"input_block_patch": [add]}}}
        if "y" in context:
            kwargs["y"] = context["y"]
        out = self.unet(xc.to(self.base.get_dtype()), t, **kwargs)
        return self.sampling.calculate_denoised(sigma, out.float(), x_noisy)


def make_unet_forward(model):
    """A self-contained ``unet_forward`` (enters and leaves a TrainingUNet per call): for evaluating weights."""
    unet = TrainingUNet(model)

    def forward(params, x_noisy, sigma, context, features):
        with unet:
            return unet(params, x_noisy, sigma, context, features)

    return forward


# ---------------------------------------------------------------------------------------------------- batches


def context_from(model, positive, batch: int, latent_hw, device) -> dict:
    """The UNet's text context (and SDXL's ``y``) for ``batch`` samples from a CONDITIONING."""
    if not isinstance(positive, list) or not positive or not isinstance(positive[0][0], torch.Tensor):
        raise ValueError("positive must be a CONDITIONING (from CLIPTextEncode)")
    cond, extras = positive[0][0], dict(positive[0][1])
    context = {"context": cond[:1].detach().clone().to(device).repeat(batch, 1, 1)}
    extras.setdefault("width", latent_hw[1] * 8)
    extras.setdefault("height", latent_hw[0] * 8)
    adm = model.model.encode_adm(device=device, **extras)
    if adm is not None:
        context["y"] = adm[:1].detach().clone().to(device).repeat(batch, 1)
    return context


class BatchPreparer:
    """``prepare_batch(batch, step)`` for the loop: latents in the model's space and the text context."""

    def __init__(self, model, vae, positive, device, *, cache_latents: bool = False):
        self.model, self.vae, self.positive, self.device = model, vae, positive, device
        self.latent_format = model.get_model_object("latent_format")
        self.cache: dict[int, torch.Tensor] | None = {} if cache_latents else None

    def encode(self, image_chw: torch.Tensor, index: int) -> torch.Tensor:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        if self.vae is None:
            raise ValueError("image samples need a VAE to encode them (or a dataset of pre-encoded latents)")
        with torch.no_grad():
            latent = self.vae.encode(image_chw.permute(1, 2, 0).unsqueeze(0)).float().cpu()[0].clone()
        if self.cache is not None and index >= 0:
            self.cache[index] = latent
        return latent

    def __call__(self, batch: dict, step: int) -> dict:
        if "latent" in batch:
            raw = batch["latent"].float()
        else:
            raw = torch.stack([self.encode(img, ref.index) for img, ref in zip(batch["image"], batch["_ref"],
                                                                               strict=True)])
        latent = self.latent_format.process_in(raw)
        hw = tuple(latent.shape[-2:])
        own = batch.get("conditioning")
        if own is not None and all(c is not None for c in own):
            parts = [context_from(self.model, c, 1, hw, self.device) for c in own]
            context = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        else:
            context = context_from(self.model, self.positive, latent.shape[0], hw, self.device)
        return {**batch, "latent": latent, "context": context}


# ------------------------------------------------------------------------------------------------------- runs


def run_training(model, vae, positive, source, *, steps: int, lr: float = 1e-4, batch_size: int = 1,
                 grad_accumulation: int = 1, preset: str = "encoder", alpha: float = 0.5, beta: float = 0.5,
                 adapter_channels: int = 128, condition_type: str = "", seed: int = 0, checkpoint_dir=None,
                 checkpoint_every: int = 0, keep_checkpoints: int = 3, resume_from=None, resume_optional=False,
                 mixed_precision: str = "no", gradient_checkpointing: bool = False, optimizer: str = "adam",
                 num_workers: int = 0, shuffle: bool = True, grad_clip: float | None = 1.0, dist=None,
                 condition_choice=None, log_extra=None, metadata=None, on_progress=None) -> rcn_train.TrainResult:
    """Train a RepControlNet for ``model`` on ``source`` (a magic_core.train_data source): the node's and the command
    line's run. ``dist``: a DistContext (the command line under torchrun); None for one process."""
    with torch.inference_mode(False), torch.enable_grad():
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        device = model.load_device
        if dist is not None and dist.is_distributed and torch.device(device) != dist.device:
            raise RuntimeError(f"rank {dist.rank}: ComfyUI loaded the model on {device} but this rank's device is "
                               f"{dist.device}")
        unet_state = dict(model.model.diffusion_model.state_dict())
        shapes = {k: tuple(v.shape) for k, v in unet_state.items()}
        family = model_family(model)
        layer_keys = rcn.default_layer_keys(shapes, family, preset)
        table = getattr(model.get_model_object("model_sampling"), "sigmas", None)
        sigmas = None if table is None else table.detach().float().cpu()
        cacheable = getattr(source, "fixed_images", False) and len(source) <= LATENT_CACHE_SAMPLES
        prepare = BatchPreparer(model, vae, positive, device, cache_latents=cacheable)
        if cacheable:
            # encode a small fixed set before training: the VAE then never competes with the training UNet for
            # the device (ComfyUI could offload the UNet to make room for it mid-run)
            for index in range(len(source)):
                prepare.encode(source.image(index), index)
            comfy.model_management.load_models_gpu([model], force_full_load=True)
        pbar = comfy.utils.ProgressBar(steps)
        started = time.perf_counter()

        def progress(step, loss):
            comfy.model_management.throw_exception_if_processing_interrupted()
            pbar.update_absolute(step, steps)
            if on_progress is not None:
                on_progress(step, loss)

        meta = {"training_resolution": str(getattr(source, "resolution", "") or "as stored"),
                "training_layers": preset, **dict(metadata or {})}
        with TrainingUNet(model, gradient_checkpointing=gradient_checkpointing) as unet_forward:
            result = rcn_train.train_repcontrolnet(
                unet_forward, unet_state, layer_keys, source, steps=steps, batch_size=batch_size,
                grad_accumulation=grad_accumulation, lr=lr, optimizer=optimizer, alpha=alpha, beta=beta,
                adapter_config={"out_channels": shapes["input_blocks.0.0.weight"][0],
                                "hidden_channels": adapter_channels},
                seed=seed, sigmas=sigmas, condition_choice=condition_choice, prepare_batch=prepare, shuffle=shuffle,
                num_workers=num_workers, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                keep_checkpoints=keep_checkpoints, resume_from=resume_from, resume_optional=resume_optional,
                on_progress=progress, log_extra=log_extra, device=device, dist=dist,
                mixed_precision=mixed_precision, grad_clip=grad_clip, model_family=family,
                condition_type=condition_type, metadata=meta)
        result.weights.metadata["training_seconds"] = f"{time.perf_counter() - started:.1f}"
        return result


def save_trained(path, weights: rcn.RepControlNetWeights) -> None:
    """Write the trained file atomically (never half a file in models/magic_repcontrolnet)."""
    rcn_train.save_weights_atomic(path, weights)

