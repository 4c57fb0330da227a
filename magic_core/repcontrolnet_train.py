"""The RepControlNet training loop: modal weights + condition adapter, base frozen; one process or many. Pure torch.

One loop serves the Train RepControlNet node and ``python -m magic_portrait train`` (alone or under ``torchrun``).

Model-agnostic: the caller passes ``unet_forward(merged, x_noisy, sigma, context, features) -> denoised`` where

- ``merged`` maps UNet state-dict keys (no ``diffusion_model.`` prefix) of the listed layers to the merged tensors
  ``W' = alpha * W + beta * W_m`` (``b'`` likewise), built differentiably so gradients reach ``W_m``; the forward
  must use exactly these tensors, also when it recomputes a block for gradient checkpointing;
- ``x_noisy = x0 + sigma * noise`` (ComfyUI's sigma parameterisation), ``sigma`` has shape ``(B,)``;
- ``context`` is what the batch carries (``prepare_batch`` puts text embeddings there), passed through untouched;
- ``features`` are the adapter's output (B, model_channels, h, w), to be added to the output of input block 0;
- the return value is the denoised estimate ``D(x, sigma)`` (what ComfyUI's ``BaseModel.apply_model`` returns for
  any parameterisation), so no prediction type is hard-coded here.

**Samples** come from a source in ``magic_core.train_data`` (pairs, core's pre-encoded shards, tar shards, or a list
of sample dicts), read by a DataLoader (``num_workers`` processes), in an order fixed by the seed alone (see that
module). Each step's ``global batch = world_size x batch_size x grad_accumulation`` samples.
``prepare_batch(batch, step) -> batch`` runs in the main process on each micro-batch (the ComfyUI side encodes
images with the VAE there, scales latents into the model's space and builds the text context); afterwards a batch
has ``latent`` (B, C, h, w), ``condition`` (B, 3, H, W), ``context`` and optionally ``loss_weight``.

**Plug-in points** (what MMF and Clone Face Tuning use):

- ``condition_choice(seed, step) -> key``: the modality of every sample of a step (``step`` counts from 0; the
  log line of that step says ``step + 1``; default: ``"condition"``); deterministic in (seed, step), so resume and
  every rank agree. When given, each loss-log line records it, and its ``description`` attribute (if any) goes into
  the trained file's metadata as ``training_conditions``.
- ``loss_weight`` in a sample: a per-pixel weight (1, H, W) at image or latent size; the loss is the weighted mean
  ``sum(w * e) / sum(w)`` over the whole global batch (the denominator is summed over ranks and micro-batches first,
  so the result does not depend on how the batch is split).
- ``loss``: ``"eps"`` (MSE between ``(x - D) / sigma`` and the noise, the standard objective), ``"x0"``, or a
  callable ``loss(denoised, x0, noise, sigma, x_noisy) -> per-element errors`` (same shape as ``x0``).
- ``log_extra(step) -> dict`` or ``log_extra(step, losses) -> dict``: more fields for the step's loss-log line
  (``step`` from 0, as above; ``losses``: the loss history up to and including that step, resumed steps included).
- ``metadata``: string entries written into the trained file (what it was trained on, the schedule ...).

**Randomness**: the adapter's init uses ``seed``; the sigma and noise of the sample in slot ``k`` of step ``s`` come
from a generator seeded by ``(seed, s, k)``; a run on W ranks with batch b draws exactly what one process with batch
W*b draws. **Distributed**: ``dist`` (a ``train_dist.DistContext``) wraps the trained parameters (modal weights +
adapter, never the base UNet) in DistributedDataParallel; rank 0 alone writes. Mixed precision: ``mixed_precision``
"bf16"/"fp16" autocasts the forward (master weights stay float32); fp16 (or an fp16 UNet) gets a gradient scaler.

Initialisation: ``W_m = W * (1 - alpha) / beta`` and a zero last adapter conv, so training starts exactly at the
base model. **Checkpoints** (``checkpoint_dir``, every ``checkpoint_every`` steps, the last ``keep_checkpoints``
kept): ``repcontrolnet_stepNNNNNNN.safetensors`` (a normal RepControlNet file, usable directly),
``...optim.safetensors`` (optimizer moments and the loss history, tensors only) and ``...json`` (step, samples
consumed, data positions, hyper-parameters), each written to a temporary file and renamed, the ``.json`` last: a
checkpoint exists once its ``.json`` does. ``losses.jsonl`` gets one ``{"step", "loss", ...}`` line per step.
Nothing is pickled.

**Resume** (from a ``.json``/``.safetensors`` or a folder's latest): the weights, optimizer state, loss history and
data position are restored. With the same world size and options the run continues bit for bit. With another
world size but the same global batch, a map-style source gives every step the very same samples, sigmas and noise;
only the order of floating-point sums differs (the gradient is reduced across ranks in another grouping). A
streaming source continues without skipping or repeating a sample, in another order. With another global batch
the sample stream continues where it stopped, in new batch boundaries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import train_data, train_streams
from .repcontrolnet import (
    ConditionAdapter,
    RepControlNetWeights,
    init_weights_from_base,
    layer_name,
    load_repcontrolnet,
    merge_tensor,
    save_repcontrolnet,
    strip_unet_prefix,
)
from .train_dist import DistContext, TrainingStopped

UnetForward = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, Any, torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ProgressFn = Callable[[int, float], Any]
PrepareFn = Callable[[dict, int], dict]

TRAIN_FORMAT = "magic_portrait.repcontrolnet.train"
STATE_VERSION = 2
CHECKPOINT_STEM = "repcontrolnet_step"
LOSS_LOG = "losses.jsonl"
PREVIOUS_RUN = "previous_run"
LOSSES_TENSOR = "training.losses"
OPTIMIZERS = ("adam", "adamw", "sgd")
MIXED_PRECISION = ("no", "bf16", "fp16")
log = logging.getLogger("magic_portrait.train")


@dataclass
class TrainStats:
    """Where the time of this process went: waiting for the DataLoader vs everything (per-step loop time)."""

    steps: int = 0
    samples: int = 0  # global samples trained on (all ranks)
    data_wait_seconds: float = 0.0
    loop_seconds: float = 0.0

    @property
    def data_wait_share(self) -> float:
        return self.data_wait_seconds / self.loop_seconds if self.loop_seconds > 0 else 0.0


@dataclass
class TrainResult:
    weights: RepControlNetWeights
    losses: list[float]
    step: int
    checkpoint: str | None = None
    stats: TrainStats = field(default_factory=TrainStats)
    resumed_from: str | None = None


def default_training_sigmas(
    num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Sigmas of the SD1.x/SDXL discrete schedule (scaled-linear betas): ``sqrt((1 - abar) / abar)``, ascending."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    return ((1.0 - abar) / abar).sqrt().to(torch.float32)


def loss_elements(loss: str | LossFn, denoised, x0, noise, sigma_b, x_noisy) -> torch.Tensor:
    """Per-element training errors (same shape as ``x0``)."""
    if callable(loss):
        out = loss(denoised, x0, noise, sigma_b, x_noisy)
        if not isinstance(out, torch.Tensor) or out.shape != x0.shape:
            raise ValueError(f"a custom loss must return per-element errors of shape {tuple(x0.shape)}")
        return out
    if loss == "eps":
        return ((x_noisy - denoised) / sigma_b - noise) ** 2
    if loss == "x0":
        return (denoised - x0) ** 2
    raise ValueError(f"loss must be 'eps', 'x0' or a callable, got {loss!r}")


# ------------------------------------------------------------------------------------------------- checkpoints


def checkpoint_paths(checkpoint_dir: str | os.PathLike, step: int) -> dict[str, str]:
    stem = os.path.join(os.fspath(checkpoint_dir), f"{CHECKPOINT_STEM}{step:07d}")
    return {"weights": stem + ".safetensors", "optimizer": stem + ".optim.safetensors", "state": stem + ".json"}


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, .json path) of every complete checkpoint in a folder (its files present), by step."""
    found = []
    if not os.path.isdir(checkpoint_dir):
        return found
    for name in os.listdir(checkpoint_dir):
        if name.startswith(CHECKPOINT_STEM) and name.endswith(".json"):
            digits = name[len(CHECKPOINT_STEM): -len(".json")]
            if digits.isdigit():
                paths = checkpoint_paths(checkpoint_dir, int(digits))
                if os.path.isfile(paths["weights"]) and os.path.isfile(paths["optimizer"]):
                    found.append((int(digits), os.path.join(os.fspath(checkpoint_dir), name)))
    return sorted(found)


def find_latest_checkpoint(checkpoint_dir: str | os.PathLike) -> str | None:
    """The ``.json`` of the highest-step complete checkpoint in a directory, or None."""
    found = list_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def _resolve_resume(resume_from: str | os.PathLike) -> str:
    path = os.fspath(resume_from)
    if os.path.isdir(path):
        found = find_latest_checkpoint(path)
        if found is None:
            raise ValueError(f"no RepControlNet training checkpoint ({CHECKPOINT_STEM}*.json) in '{path}'")
        return found
    if path.endswith(".optim.safetensors"):
        path = path[: -len(".optim.safetensors")] + ".json"
    elif path.endswith(".safetensors"):
        path = path[: -len(".safetensors")] + ".json"
    if not os.path.isfile(path):
        raise ValueError(f"training checkpoint state '{path}' does not exist")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> str:
    """``write(tmp_path)``, flush it to disk, then rename over ``path``: readers see the old file or the whole new
    one, never half a file, even if the process dies mid-write."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every platform)
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def save_weights_atomic(path: str | os.PathLike, weights: RepControlNetWeights) -> str:
    return atomic_write(path, lambda tmp: save_repcontrolnet(tmp, weights))


def _write_json(path: str, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)

    atomic_write(path, write)


def read_checkpoint(resume_from: str | os.PathLike) -> dict:
    """{"path", "state", "weights", "optimizer" (tensors), "losses"} of a training checkpoint."""
    from safetensors.torch import load_file

    state_path = _resolve_resume(resume_from)
    with open(state_path, encoding="utf-8") as f:
        state = json.load(f)
    if state.get("format") != TRAIN_FORMAT:
        raise ValueError(f"'{state_path}' is not a RepControlNet training checkpoint (format {state.get('format')!r})")
    if int(state.get("version", 1)) > STATE_VERSION:
        raise ValueError(f"'{state_path}' was written by a newer Magic Portrait (state version {state['version']})")
    folder = os.path.dirname(state_path)
    weights = load_repcontrolnet(os.path.join(folder, state["weights_file"]))
    tensors = load_file(os.path.join(folder, state["optimizer_file"]))
    history = tensors.pop(LOSSES_TENSOR, None)
    losses = history.tolist() if history is not None else [float(v) for v in state.get("losses", [])]
    return {"path": state_path, "state": state, "weights": weights, "optimizer": tensors,
            "losses": losses[: int(state["step"])]}


def _prune(checkpoint_dir: str, keep: int) -> None:
    if keep <= 0:
        return
    for _, state_path in list_checkpoints(checkpoint_dir)[:-keep]:
        stem = state_path[: -len(".json")]
        for path in (state_path, stem + ".safetensors", stem + ".optim.safetensors"):  # the .json first
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


# ---------------------------------------------------------------------------------------------------- the model


class TrainableRepControlNet(torch.nn.Module):
    """The trained parameters only (what DistributedDataParallel wraps): the modal weights (float32 masters) and the
    condition adapter. ``forward(cond, latent_hw)`` -> (adapter features, merged layer tensors)."""

    def __init__(self, weights: RepControlNetWeights, base: Mapping[str, torch.Tensor], device, param_dtype=None):
        super().__init__()
        self.keys = sorted(weights.modal)
        self.adapter = ConditionAdapter(**weights.adapter_config)
        self.adapter.load_state_dict(weights.adapter_state)
        self.modal = torch.nn.ParameterList(
            # no copy where the tensor is float32 on the device already: the loop drops its own reference
            torch.nn.Parameter(weights.modal[k].detach().to(device=device, dtype=torch.float32)) for k in self.keys)
        self.to(device)
        self.adapter.train()
        self._base = {k: base[k].detach().to(device) for k in self.keys}  # frozen; not a parameter, never synced
        self._coefs = {k: weights.coefficients(k.rsplit(".", 1)[0]) for k in self.keys}
        self._dtypes = {k: param_dtype or base[k].dtype for k in self.keys}

    def names(self) -> list[str]:
        """Checkpoint names of the parameters, in ``parameters()`` order."""
        return [f"modal.{k}" for k in self.keys] + [f"adapter.{n}" for n, _ in self.adapter.named_parameters()]

    def ordered_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.modal) + [p for _, p in self.adapter.named_parameters()]

    def forward(self, cond: torch.Tensor, latent_hw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        features = self.adapter(cond, latent_hw=latent_hw)
        merged = {}
        for k, p in zip(self.keys, self.modal, strict=True):
            a, b = self._coefs[k]
            merged[k] = merge_tensor(self._base[k], p, a, b).to(self._dtypes[k])
        return features, merged

    def snapshot(self, template: RepControlNetWeights, metadata: Mapping[str, str]) -> RepControlNetWeights:
        return RepControlNetWeights(
            adapter_state={k: v.detach().cpu().clone() for k, v in self.adapter.state_dict().items()},
            adapter_config=self.adapter.config,
            modal={k: p.detach().cpu().clone() for k, p in zip(self.keys, self.modal, strict=True)},
            alpha=template.alpha,
            beta=template.beta,
            layer_alpha=dict(template.layer_alpha),
            layer_beta=dict(template.layer_beta),
            model_family=template.model_family,
            condition_type=template.condition_type,
            metadata=dict(metadata),
        )


def _optimizer(name: str, params, lr: float, betas) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=0.0)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def _optimizer_tensors(opt: torch.optim.Optimizer, names: list[str]) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for i, entry in opt.state_dict()["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{names[i]}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(names[i], {})[k] = v
    return tensors, scalars


def _load_optimizer(opt: torch.optim.Optimizer, names: list[str], tensors: Mapping, scalars: Mapping) -> None:
    per_param: dict[int, dict] = {}
    for i, name in enumerate(names):
        prefix = f"state.{name}."
        entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        entry.update(scalars.get(name, {}))
        if entry:
            per_param[i] = entry
    opt.load_state_dict({"state": per_param, "param_groups": opt.state_dict()["param_groups"]})


def _sync_optimizer(opt: torch.optim.Optimizer, ctx: DistContext) -> None:
    """Rank 0's optimizer state on every rank (the others start empty)."""
    if not ctx.is_distributed:
        return
    params = [p for g in opt.param_groups for p in g["params"]]
    spec = None
    if ctx.is_main:
        spec = {i: {k: (("tensor", tuple(v.shape), str(v.dtype).removeprefix("torch."), str(v.device))
                        if isinstance(v, torch.Tensor) else ("value", v)) for k, v in opt.state[p].items()}
                for i, p in enumerate(params) if opt.state[p]}
    spec = ctx.broadcast_object(spec)
    if not spec:
        return
    tensors = []
    for i, entries in spec.items():
        state = opt.state[params[i]]
        for k, (kind, *info) in sorted(entries.items()):
            if kind == "value":
                state[k] = info[0]
                continue
            shape, dtype, device = info
            if not ctx.is_main:
                state[k] = torch.zeros(shape, dtype=getattr(torch, dtype),
                                       device=params[i].device if device != "cpu" else "cpu")
            tensors.append(state[k])
    comm = [t if t.device == ctx.device or ctx.backend != "nccl" else t.to(ctx.device) for t in tensors]
    ctx.broadcast_tensors(comm)
    for t, c in zip(tensors, comm, strict=True):
        if c is not t:
            t.copy_(c)


# --------------------------------------------------------------------------------------------------- the loop


def train_repcontrolnet(
    unet_forward: UnetForward,
    base_named_params: Mapping[str, torch.Tensor],
    layer_keys: Iterable[str],
    samples: Any,
    *,
    steps: int,
    batch_size: int = 1,
    grad_accumulation: int = 1,
    lr: float = 1e-4,
    optimizer: str = "adam",
    alpha: float = 0.5,
    beta: float = 0.5,
    adapter_config: Mapping,
    seed: int = 0,
    sigmas: torch.Tensor | None = None,
    loss: str | LossFn = "eps",
    condition_choice: train_data.ConditionChoice | None = None,
    prepare_batch: PrepareFn | None = None,
    shuffle: bool = True,
    num_workers: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 3,
    resume_from: str | os.PathLike | None = None,
    resume_optional: bool = False,
    on_progress: ProgressFn | None = None,
    log_extra: Callable[..., Mapping] | None = None,
    device: str | torch.device | None = None,
    dist: DistContext | None = None,
    param_dtype: torch.dtype | None = None,
    mixed_precision: str = "no",
    grad_clip: float | None = None,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    model_family: str = "sd15",
    condition_type: str = "",
    metadata: Mapping[str, str] | None = None,
) -> TrainResult:
    """Train modal weights + adapter for ``steps`` optimizer steps in total (a resumed run continues its count).

    ``base_named_params``: base UNet tensors (at least the listed layers'; prefix optional), frozen.
    ``layer_keys``: module paths or ``.weight`` keys (e.g. from ``default_layer_keys``).
    ``samples``: a ``train_data`` source or a list of sample dicts. ``batch_size`` is per process and micro-batch.
    ``sigmas``: table the training sigmas are drawn from uniformly (default: ``default_training_sigmas()``).
    ``adapter_config``: ``ConditionAdapter`` arguments; ``out_channels`` must be the UNet's model_channels.
    ``on_progress(step, loss)`` is called after every step (raise from it to stop; the last checkpoint stays).
    ``param_dtype``: dtype the merged tensors are handed to ``unet_forward`` in (default: the base tensor's dtype).
    ``dist``: the process group (default: one process on ``device``). See the module docstring for the rest.
    """
    ctx = dist or DistContext.single(device or "cpu")
    device = ctx.device if dist is not None else torch.device(device or "cpu")
    for name, value, low in (("steps", steps, 0), ("batch_size", batch_size, 1),
                             ("grad_accumulation", grad_accumulation, 1), ("checkpoint_every", checkpoint_every, 0),
                             ("num_workers", num_workers, 0)):
        if int(value) < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {mixed_precision!r}")
    _optimizer(optimizer, [torch.nn.Parameter(torch.zeros(1))], lr, adam_betas)  # validates the name early
    layers = list(dict.fromkeys(layer_name(k) for k in layer_keys))
    if not layers:
        raise ValueError("no layers to train: pass layer_keys (e.g. default_layer_keys(...))")
    base_all = {strip_unet_prefix(k): v for k, v in base_named_params.items()}
    adapter_config = dict(adapter_config)
    adapter_now = ConditionAdapter(**adapter_config).config
    conv_in = base_all.get("input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[0] != adapter_now["out_channels"]:
        raise ValueError(f"adapter_config out_channels ({adapter_now['out_channels']}) must equal the UNet's "
                         f"model_channels ({conv_in.shape[0]})")
    source = train_data.as_source(samples)
    streaming = train_data.is_stream(source)
    layout = train_data.BatchLayout(ctx.world_size, ctx.rank, int(batch_size), int(grad_accumulation))
    table = (default_training_sigmas() if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float32))
    table = table.flatten().cpu()
    if table.numel() == 0 or not bool((table > 0).all()):
        raise ValueError("training sigmas must be a non-empty table of positive values")

    # ---- resume: rank 0 reads, every rank gets the state
    resumed, resumed_weights, resumed_optimizer = None, None, {}
    if resume_optional and resume_from is not None and ctx.is_main and not os.path.isfile(resume_from) and \
            find_latest_checkpoint(resume_from) is None:
        resume_from = None  # nothing to resume yet: a fresh start (rank 0 decides for every rank)
    if ctx.is_distributed or resume_from is not None:
        if ctx.is_main and resume_from is not None:
            try:
                resumed = read_checkpoint(resume_from)
                _check_resume(resumed, layers=layers, alpha=alpha, beta=beta, adapter_config=adapter_now)
                # tensors stay on rank 0: DDP broadcasts the parameters, _sync_optimizer the moments
                resumed_weights, resumed_optimizer = resumed.pop("weights"), resumed.pop("optimizer")
                resumed["overrides"] = (resumed_weights.layer_alpha, resumed_weights.layer_beta)
            except (ValueError, OSError, KeyError) as err:
                resumed = ValueError(str(err))
        resumed = ctx.broadcast_object(resumed)
    if resumed_weights is not None:
        weights = resumed_weights
    else:
        weights = init_weights_from_base(base_all, layers, adapter_config=adapter_config, alpha=alpha, beta=beta,
                                         seed=seed, model_family=model_family, condition_type=condition_type)
        if resumed is not None:  # the other ranks: rank 0's values arrive with DDP, per-layer coefficients here
            weights.layer_alpha, weights.layer_beta = (dict(d) for d in resumed["overrides"])
    state = resumed["state"] if resumed is not None else {}
    start_step = int(state.get("step", 0))
    losses = list(resumed["losses"]) if resumed is not None else []
    data_resume = _data_resume(state, source, layout, ctx, seed=seed, shuffle=shuffle)

    # ---- model, optimizer
    missing = [k for k in weights.modal if k not in base_all]
    if missing:
        raise ValueError(f"the base weights lack {len(missing)} trained tensors, e.g. {missing[:3]}")
    module = TrainableRepControlNet(weights, base_all, device, param_dtype)
    # the module holds the tensors now; keep only the file's settings (one copy of the modal weights, not two)
    weights = dataclasses.replace(weights, modal={}, adapter_state={})
    resumed_weights = None
    names = module.names()
    opt = _optimizer(optimizer, module.ordered_parameters(), lr, adam_betas)
    if resumed is not None and ctx.is_main:
        opt_tensors = {k: v.to(device) for k, v in resumed_optimizer.items()}
        _load_optimizer(opt, names, opt_tensors, state.get("optimizer_scalars", {}))
    _sync_optimizer(opt, ctx)
    trained = ctx.wrap(module)  # DDP broadcasts rank 0's parameters: every rank starts equal
    use_scaler = mixed_precision == "fp16" or any(module._dtypes[k] == torch.float16 for k in module.keys)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    if use_scaler and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)
                if mixed_precision != "no" else contextlib.nullcontext())

    # ---- outputs (rank 0)
    writes = checkpoint_dir is not None and ctx.is_main
    log_path = None
    if writes:
        os.makedirs(checkpoint_dir, exist_ok=True)
        if resumed is None:
            _set_aside_previous_run(os.fspath(checkpoint_dir))
        log_path = os.path.join(os.fspath(checkpoint_dir), LOSS_LOG)
        _restart_log(log_path, losses)
    extra_meta = dict(metadata or {})
    extra_meta.setdefault("training_data", source.describe())
    extra_meta["training_global_batch"] = str(layout.global_batch)
    if condition_choice is not None:
        extra_meta.setdefault("training_conditions", getattr(condition_choice, "description", repr(condition_choice)))
        if getattr(condition_choice, "modalities", None):
            extra_meta.setdefault("trained_modalities", ",".join(condition_choice.modalities))
    wants_losses = log_extra is not None and _positional_count(log_extra) >= 2

    def snapshot(step: int) -> RepControlNetWeights:
        meta = dict(extra_meta)
        meta.update({"training_step": str(step), "training_seed": str(seed)})
        return module.snapshot(weights, meta)

    def save_checkpoint(step: int, position: Any) -> str:
        paths = checkpoint_paths(checkpoint_dir, step)
        if not writes:
            return paths["state"]
        save_weights_atomic(paths["weights"], snapshot(step))
        tensors, scalars = _optimizer_tensors(opt, names)
        tensors[LOSSES_TENSOR] = torch.tensor(losses, dtype=torch.float64)
        from safetensors.torch import save_file

        atomic_write(paths["optimizer"], lambda tmp: save_file(tensors, tmp))
        _write_json(paths["state"], {
            "format": TRAIN_FORMAT, "version": STATE_VERSION, "step": step, "seed": seed, "lr": lr,
            "optimizer": optimizer, "alpha": weights.alpha, "beta": weights.beta, "layers": layers,
            "adapter_config": module.adapter.config, "loss": loss if isinstance(loss, str) else "custom",
            "mixed_precision": mixed_precision, "batch_size": layout.batch_size,
            "grad_accumulation": layout.accumulation, "world_size": layout.world_size,
            "global_batch": layout.global_batch, "shuffle": bool(shuffle), "data": position,
            "weights_file": os.path.basename(paths["weights"]),
            "optimizer_file": os.path.basename(paths["optimizer"]), "optimizer_scalars": scalars,
            "grad_scaler": scaler.state_dict() if use_scaler else None})
        _prune(os.fspath(checkpoint_dir), keep_checkpoints)
        return paths["state"]

    # ---- data
    batches, plan = train_data.make_loader(source, layout, seed=seed, start_step=start_step, steps=steps,
                                           resume=data_resume, shuffle=shuffle, condition_choice=condition_choice,
                                           num_workers=num_workers, pin_memory=device.type == "cuda")
    stream_where = None

    def data_position(step: int) -> dict:
        if streaming:
            mine = plan.position_after(stream_where) if stream_where is not None else plan.position
            ranks = ctx.all_gather_object(mine)
            return {"kind": "stream", "shards": len(source), "world_size": ctx.world_size, "ranks": ranks}
        return {"kind": "map", "samples": len(source),
                "position": plan.start_position + (step - start_step) * layout.global_batch}

    stats = TrainStats()
    confirmed = resumed["path"] if resumed is not None else None  # a checkpoint every rank knows is complete
    pending = None
    step = start_step
    ctx.start_heartbeat()
    try:
        while step < steps:
            loop_start = time.perf_counter()
            ctx.mark_step(step)
            micro = []
            for _ in range(layout.accumulation):
                wait = time.perf_counter()
                batch = next(batches)
                stats.data_wait_seconds += time.perf_counter() - wait
                if streaming:
                    stream_where = batch["_where"][-1]
                micro.append(_inputs(batch, step, prepare_batch, device, table, seed))
            local_den = sum(float(m["weight"].expand_as(m["x0"]).sum()) if m["weight"] is not None
                            else float(m["x0"].numel()) for m in micro)
            den = float(ctx.all_reduce_sum(torch.tensor(local_den, dtype=torch.float64)))
            if pending is not None:  # rank 0 finished writing it before it joined this collective
                confirmed, pending = pending, None
            if not den > 0:
                raise ValueError(f"step {step + 1}: the loss weights of the global batch sum to {den}: a weight map "
                                 "must be positive somewhere")
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), dtype=torch.float64, device=device)
            for i, m in enumerate(micro):
                sync = i == len(micro) - 1 or not ctx.is_distributed
                with contextlib.nullcontext() if sync else trained.no_sync():
                    with autocast:
                        features, merged = trained(m["cond"], m["x0"].shape[-2:])
                        denoised = unet_forward(merged, m["x_noisy"], m["sigma"], m["context"], features)
                    errors = loss_elements(loss, denoised.float(), m["x0"], m["noise"], m["sigma_b"], m["x_noisy"])
                    weighted = (errors * m["weight"]).sum() if m["weight"] is not None else errors.sum()
                    # DDP averages over ranks: scale by the world size so the result is sum(w e) / sum(w) globally
                    scaler.scale(weighted * (ctx.world_size / den)).backward()
                    total += weighted.detach().double()
            value = float(ctx.all_reduce_sum(total)) / den
            if not math.isfinite(value):
                raise RuntimeError(f"RepControlNet training diverged at step {step + 1} (loss {value}); lower the "
                                   "learning rate" + (" or use bf16" if mixed_precision == "fp16" else ""))
            if grad_clip is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
            scaler.step(opt)
            scaler.update()
            step += 1
            losses.append(value)
            stats.steps += 1
            stats.samples += layout.global_batch
            if log_path is not None:
                line = {"step": step, "loss": value}
                if condition_choice is not None:
                    line["condition"] = condition_choice(seed, step - 1)
                if log_extra is not None:
                    line.update(log_extra(step - 1, losses) if wants_losses else log_extra(step - 1))
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(line) + "\n")
            if checkpoint_dir is not None and checkpoint_every and step % checkpoint_every == 0:
                pending = save_checkpoint(step, data_position(step))
                if ctx.is_main:  # written and renamed into place; the others learn it at the next collective
                    confirmed, pending = pending, None
            stats.loop_seconds += time.perf_counter() - loop_start
            if on_progress is not None:
                on_progress(step, value)
        last = None
        if checkpoint_dir is not None:
            done = checkpoint_paths(checkpoint_dir, step)["state"]
            last = done if pending == done or confirmed == done else save_checkpoint(step, data_position(step))
    except TrainingStopped:
        raise
    except Exception as exc:
        # stop the loader's worker processes first: a launcher that stops this process group would end them, and
        # the DataLoader would then raise again in the middle of the report
        batches = None  # noqa: F841 (dropping the last reference shuts the workers down)
        if ctx.is_distributed:
            raise ctx.stopped(exc, step=step, checkpoint=confirmed) from exc
        raise
    return TrainResult(weights=snapshot(step), losses=losses, step=step, checkpoint=last, stats=stats,
                       resumed_from=resumed["path"] if resumed is not None else None)


def _positional_count(fn) -> int:
    """How many positional arguments ``fn`` takes (a large number for ``*args``)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    kinds = [p.kind for p in params]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return 99
    return sum(k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds)


def _check_resume(resumed: Mapping, *, layers, alpha, beta, adapter_config) -> None:
    state = resumed["state"]
    for what, saved, now in (("layers", state["layers"], layers), ("alpha", state["alpha"], float(alpha)),
                             ("beta", state["beta"], float(beta)),
                             ("adapter_config", state["adapter_config"], adapter_config)):
        if saved != now:
            raise ValueError(f"cannot resume from '{resumed['path']}': its {what} ({saved}) differ from this run's "
                             f"({now})")


def _data_resume(state: Mapping, source, layout: train_data.BatchLayout, ctx: DistContext, *, seed: int,
                 shuffle: bool) -> dict:
    """Where this rank's data continues after a checkpoint (see the module docstring for what is exact)."""
    if not state:
        return {}
    data = state.get("data") or {}
    step = int(state["step"])
    if train_data.is_stream(source):
        if data.get("kind") != "stream" or int(data.get("shards", -1)) != len(source):
            log.warning("the checkpoint's data position does not fit this tar dataset (%s shards now): its stream "
                        "restarts at the next epoch", len(source))
            return {}
        ranks = data["ranks"]
        if int(data["world_size"]) == layout.world_size and bool(state.get("shuffle", True)) == shuffle:
            return {"stream": ranks[layout.rank]}
        dealt = train_streams.redistribute_streams(ranks, num_shards=len(source), seed=seed,
                                                old_world=int(data["world_size"]), new_world=layout.world_size,
                                                shuffle=shuffle)
        if ctx.is_main:
            log.warning("resuming a tar-stream run of %s processes on %s: the rest of the interrupted epoch is dealt "
                        "out anew (no sample skipped or repeated, in another order)", data["world_size"],
                        layout.world_size)
        return {"stream": dealt[layout.rank]}
    if data.get("kind") == "map":
        if int(data.get("samples", len(source))) != len(source) and ctx.is_main:
            log.warning("the dataset had %s samples at the checkpoint and has %s now: the sample order changes",
                        data.get("samples"), len(source))
        return {"position": int(data["position"])}
    return {"position": step * int(state.get("global_batch", layout.global_batch))}


def _set_aside_previous_run(checkpoint_dir: str) -> None:
    """A fresh start in a folder holding another run's checkpoints moves them (and its loss log) into
    ``previous_run/`` (replacing what an older fresh start put there), so a later resume cannot pick them up."""
    found = list_checkpoints(checkpoint_dir)
    if not found:
        return
    aside = os.path.join(checkpoint_dir, PREVIOUS_RUN)
    if os.path.isdir(aside):
        for name in os.listdir(aside):
            os.remove(os.path.join(aside, name))
    os.makedirs(aside, exist_ok=True)
    for _, state_path in found:
        stem = state_path[: -len(".json")]
        for path in (state_path, stem + ".safetensors", stem + ".optim.safetensors"):
            os.replace(path, os.path.join(aside, os.path.basename(path)))
    log_path = os.path.join(checkpoint_dir, LOSS_LOG)
    if os.path.isfile(log_path):
        os.replace(log_path, os.path.join(aside, LOSS_LOG))
    log.warning("a fresh run in %s: the checkpoints of the previous run were moved to %s", checkpoint_dir, aside)


def _restart_log(path: str, losses: list[float]) -> None:
    """The loss log up to the resumed step: the lines already there (with their extra fields) where they match."""
    kept = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    break
                if len(kept) >= len(losses) or entry.get("step") != len(kept) + 1:
                    break
                kept.append(entry)
    kept += [{"step": i + 1, "loss": v} for i, v in enumerate(losses) if i >= len(kept)]

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for entry in kept:
                f.write(json.dumps(entry) + "\n")

    atomic_write(path, write)


def _inputs(batch: dict, step: int, prepare: PrepareFn | None, device, table: torch.Tensor, seed: int) -> dict:
    """A micro-batch's tensors: prepared latents, conditions, weights, and its slots' sigmas and noise."""
    if prepare is not None:
        batch = prepare(batch, step)
    for name in ("latent", "condition"):
        if name not in batch:
            raise ValueError(f"a training batch needs '{name}' (got {sorted(k for k in batch if k[0] != '_')}); "
                             "image samples need a prepare_batch that encodes them")
    x0 = batch["latent"].to(device=device, dtype=torch.float32)
    if x0.ndim != 4:
        raise ValueError(f"latents must batch to (B, C, h, w), got {tuple(x0.shape)}")
    refs = batch["_ref"]
    idx, noise = [], []
    for ref in refs:
        g = train_data.generator(seed, "noise", ref.step, ref.slot)
        idx.append(int(torch.randint(table.numel(), (1,), generator=g)))
        noise.append(torch.randn(x0.shape[1:], generator=g, dtype=torch.float32))
    sigma = table[torch.tensor(idx)].to(device)
    noise = torch.stack(noise).to(device)
    sigma_b = sigma.view(-1, *([1] * (x0.ndim - 1)))
    weight = batch.get("loss_weight")
    if weight is not None:
        weight = weight.to(device=device, dtype=torch.float32)
        if weight.ndim == 3:
            weight = weight.unsqueeze(1)
        weight = train_data.resize_weight(weight, x0.shape[-2:])
        if bool((weight < 0).any()):
            raise ValueError(f"loss weights must be >= 0 ({batch.get('key')})")
    return {"x0": x0, "cond": batch["condition"].to(device=device, dtype=torch.float32), "sigma": sigma,
            "sigma_b": sigma_b, "noise": noise, "x_noisy": x0 + sigma_b * noise, "weight": weight,
            "context": batch.get("context")}
