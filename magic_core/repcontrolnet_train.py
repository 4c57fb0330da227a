"""Training core for RepControlNet: modal weights + condition adapter on (latent, condition) pairs. Pure torch.

Model-agnostic: the caller passes ``unet_forward(params, x_noisy, sigma, context, features) -> denoised`` where

- ``params`` maps UNet state-dict keys (no ``diffusion_model.`` prefix) of the listed layers to the merged tensors
  ``W' = alpha * W + beta * W_m`` (``b'`` likewise), built differentiably so gradients reach ``W_m``. In ComfyUI:
  ``torch.func.functional_call(diffusion_model, params, args, kwargs, strict=False)`` (only those keys are swapped);
- ``x_noisy = x0 + sigma * noise`` (ComfyUI's sigma parameterisation), ``sigma`` has shape ``(B,)``;
- ``context`` is whatever the batch carried (text embeddings, a dict of extra conds ...), passed through untouched;
- ``features`` are the adapter's output (B, model_channels, h, w), to be added to the output of input block 0;
- the return value is the denoised estimate ``D(x, sigma)`` (what ComfyUI's ``BaseModel.apply_model`` returns for
  any parameterisation), so no prediction type is hard-coded here.

The loss is ``"eps"`` (default: MSE between ``(x - D) / sigma`` and the noise, the standard epsilon objective),
``"x0"`` (MSE between ``D`` and ``x0``) or a callable ``loss(denoised, x0, noise, sigma) -> scalar``.

Initialisation: the base weights are frozen; ``W_m = W * (1 - alpha) / beta`` (``= W`` for the default
``alpha = beta = 0.5``) and the adapter's last conv is zero, so training starts exactly at the base model and the
merge stays exact throughout (the merged layer *is* the trained layer). alpha/beta are fixed during training.

Determinism: the adapter init uses ``seed``; step ``n`` draws its sigmas and noise from a generator seeded with
``(seed, n)``, batches come from ``pairs`` by step index, so a resumed run reproduces an uninterrupted one.

Checkpoints (``checkpoint_dir``): ``repcontrolnet_step0000100.safetensors`` (a normal RepControlNet file, usable
directly; metadata ``training_step``), ``...optim.safetensors`` (Adam moments, tensors only), ``...json`` (step,
hyper-parameters, loss history), and ``losses.jsonl`` with one ``{"step", "loss"}`` line per step. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

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

UnetForward = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, Any, torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ProgressFn = Callable[[int, float], Any]

TRAIN_FORMAT = "magic_portrait.repcontrolnet.train"
CHECKPOINT_STEM = "repcontrolnet_step"
LOSS_LOG = "losses.jsonl"


@dataclass
class TrainResult:
    weights: RepControlNetWeights
    losses: list[float]
    step: int
    checkpoint: str | None = None


def default_training_sigmas(
    num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Sigmas of the SD1.x/SDXL discrete schedule (scaled-linear betas): ``sqrt((1 - abar) / abar)``, ascending."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    return ((1.0 - abar) / abar).sqrt().to(torch.float32)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    if isinstance(batch, Mapping):
        if "latent" not in batch or "condition" not in batch:
            raise ValueError(f"a training batch needs 'latent' and 'condition', got keys {sorted(batch)}")
        return batch["latent"], batch["condition"], batch.get("context")
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)
    raise ValueError(
        "a training batch is a dict {latent, condition[, context]} or a tuple (latent, condition[, context])"
    )


class _Batches:
    """Step-indexed batches: callable(step), Sequence[step % len], or an iterable cycled (skipping on resume)."""

    def __init__(self, pairs: Any, start_step: int):
        self.pairs = pairs
        self.iterator = None
        if callable(pairs) and not isinstance(pairs, (Sequence, Mapping)):
            self.kind = "callable"
        elif isinstance(pairs, Sequence):
            if len(pairs) == 0:
                raise ValueError("no training pairs")
            self.kind = "sequence"
        elif isinstance(pairs, Iterable):
            self.kind = "iterable"
            self.iterator = iter(pairs)
            for _ in range(start_step):
                self._next()
        else:
            raise ValueError("pairs must be a callable(step), a sequence or an iterable of batches")

    def _next(self):
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.pairs)
            try:
                return next(self.iterator)
            except StopIteration:
                raise ValueError("no training pairs") from None

    def get(self, step: int):
        if self.kind == "callable":
            return self.pairs(step)
        if self.kind == "sequence":
            return self.pairs[step % len(self.pairs)]
        return self._next()


def _loss_value(loss: str | LossFn, denoised, x0, noise, sigma_b, x_noisy) -> torch.Tensor:
    if callable(loss):
        return loss(denoised, x0, noise, sigma_b)
    if loss == "eps":
        return torch.mean(((x_noisy - denoised) / sigma_b - noise) ** 2)
    if loss == "x0":
        return torch.mean((denoised - x0) ** 2)
    raise ValueError(f"loss must be 'eps', 'x0' or a callable, got {loss!r}")


def checkpoint_paths(checkpoint_dir: str | os.PathLike, step: int) -> dict[str, str]:
    stem = os.path.join(os.fspath(checkpoint_dir), f"{CHECKPOINT_STEM}{step:07d}")
    return {"weights": stem + ".safetensors", "optimizer": stem + ".optim.safetensors", "state": stem + ".json"}


def find_latest_checkpoint(checkpoint_dir: str | os.PathLike) -> str | None:
    """The ``.json`` of the highest-step checkpoint in a directory, or None."""
    best, best_step = None, -1
    for name in os.listdir(checkpoint_dir):
        if name.startswith(CHECKPOINT_STEM) and name.endswith(".json"):
            digits = name[len(CHECKPOINT_STEM) : -len(".json")]
            if digits.isdigit() and int(digits) > best_step:
                best, best_step = os.path.join(os.fspath(checkpoint_dir), name), int(digits)
    return best


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


def _atomic_write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def train_repcontrolnet(
    unet_forward: UnetForward,
    base_named_params: Mapping[str, torch.Tensor],
    layer_keys: Iterable[str],
    pairs: Any,
    *,
    steps: int,
    lr: float = 1e-4,
    alpha: float = 0.5,
    beta: float = 0.5,
    adapter_config: Mapping,
    seed: int = 0,
    sigmas: torch.Tensor | None = None,
    loss: str | LossFn = "eps",
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume_from: str | os.PathLike | None = None,
    on_progress: ProgressFn | None = None,
    device: str | torch.device = "cpu",
    param_dtype: torch.dtype | None = None,
    grad_clip: float | None = None,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    model_family: str = "sd15",
    condition_type: str = "",
    metadata: Mapping[str, str] | None = None,
) -> TrainResult:
    """Train modal weights + adapter for ``steps`` optimizer steps in total (a resumed run continues its count).

    ``base_named_params``: base UNet tensors (at least the listed layers' weights/biases; prefix optional), frozen.
    ``layer_keys``: module paths or ``.weight`` keys (e.g. from ``default_layer_keys``).
    ``pairs``: batches ``{"latent": x0 (B,C,h,w), "condition": (B,3,8h,8w) in [0,1], "context": any}`` (or tuples)
    as a ``callable(step)``, a sequence (indexed ``step % len``) or an iterable (cycled; skipped ahead on resume).
    ``sigmas``: table the training sigmas are drawn from uniformly (default: ``default_training_sigmas()``).
    ``adapter_config``: ``ConditionAdapter`` arguments; ``out_channels`` must be the UNet's model_channels.
    ``on_progress(step, loss)`` is called after every step (raise from it to stop; the last checkpoint stays).
    ``param_dtype``: dtype the merged tensors are handed to ``unet_forward`` in (default: the base tensor's dtype);
    master weights are float32. Checkpoints every ``checkpoint_every`` steps (0: only at the end) into
    ``checkpoint_dir``; ``resume_from`` is a checkpoint ``.json``/``.safetensors`` or a directory (latest).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    device = torch.device(device)
    layers = list(dict.fromkeys(layer_name(k) for k in layer_keys))
    if not layers:
        raise ValueError("no layers to train: pass layer_keys (e.g. default_layer_keys(...))")
    base_all = {strip_unet_prefix(k): v for k, v in base_named_params.items()}
    adapter_config = dict(adapter_config)
    conv_in = base_all.get("input_blocks.0.0.weight")
    out_channels = ConditionAdapter(**adapter_config).out_channels
    if conv_in is not None and conv_in.shape[0] != out_channels:
        raise ValueError(
            f"adapter_config out_channels ({out_channels}) must equal the UNet's model_channels ({conv_in.shape[0]})"
        )

    # ---- state: fresh or resumed
    start_step, losses = 0, []
    opt_tensors: dict[str, torch.Tensor] | None = None
    opt_scalars: dict = {}
    if resume_from is not None:
        state_path = _resolve_resume(resume_from)
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        if state.get("format") != TRAIN_FORMAT:
            raise ValueError(
                f"'{state_path}' is not a RepControlNet training checkpoint (format {state.get('format')!r})"
            )
        folder = os.path.dirname(state_path)
        weights = load_repcontrolnet(os.path.join(folder, state["weights_file"]))
        for what, saved, now in (
            ("layers", state["layers"], layers),
            ("alpha", state["alpha"], float(alpha)),
            ("beta", state["beta"], float(beta)),
            ("adapter_config", state["adapter_config"], ConditionAdapter(**adapter_config).config),
        ):
            if saved != now:
                raise ValueError(
                    f"cannot resume from '{state_path}': its {what} ({saved}) differ from this run's ({now})"
                )
        from safetensors.torch import load_file

        opt_tensors = load_file(os.path.join(folder, state["optimizer_file"]))
        opt_scalars = state.get("optimizer_scalars", {})
        start_step = int(state["step"])
        losses = [float(v) for v in state["losses"]][:start_step]
    else:
        weights = init_weights_from_base(
            base_all,
            layers,
            adapter_config=adapter_config,
            alpha=alpha,
            beta=beta,
            seed=seed,
            model_family=model_family,
            condition_type=condition_type,
        )

    base = {}
    for key in weights.modal:
        base[key] = base_all[key].detach().to(device)
    adapter = ConditionAdapter(**weights.adapter_config).to(device)
    adapter.load_state_dict(weights.adapter_state)
    adapter.train()
    modal_keys = sorted(weights.modal)
    modal = {
        k: torch.nn.Parameter(weights.modal[k].detach().to(device=device, dtype=torch.float32).clone())
        for k in modal_keys
    }
    names = [f"modal.{k}" for k in modal_keys] + [f"adapter.{n}" for n, _ in adapter.named_parameters()]
    params = [modal[k] for k in modal_keys] + [p for _, p in adapter.named_parameters()]
    opt = torch.optim.Adam(params, lr=lr, betas=adam_betas, weight_decay=0.0)
    if opt_tensors is not None:
        sd = opt.state_dict()
        per_param: dict[int, dict] = {}
        for i, name in enumerate(names):
            entry = {}
            for k, v in opt_tensors.items():
                if k.startswith(f"state.{name}."):
                    entry[k[len(f"state.{name}.") :]] = v
            entry.update(opt_scalars.get(name, {}))
            if entry:
                per_param[i] = entry
        opt.load_state_dict({"state": per_param, "param_groups": sd["param_groups"]})

    coefs = {k: weights.coefficients(k.rsplit(".", 1)[0]) for k in modal_keys}
    table = (
        (default_training_sigmas() if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float32)).flatten().cpu()
    )
    if table.numel() == 0 or not bool((table > 0).all()):
        raise ValueError("training sigmas must be a non-empty table of positive values")
    batches = _Batches(pairs, start_step)

    log_path = None
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        log_path = os.path.join(os.fspath(checkpoint_dir), LOSS_LOG)
        with open(log_path, "w", encoding="utf-8") as f:
            for i, v in enumerate(losses):
                f.write(json.dumps({"step": i + 1, "loss": v}) + "\n")

    def snapshot(step: int) -> RepControlNetWeights:
        extra = dict(metadata or {})
        extra.update({"training_step": str(step), "training_seed": str(seed)})
        return RepControlNetWeights(
            adapter_state={k: v.detach().cpu().clone() for k, v in adapter.state_dict().items()},
            adapter_config=adapter.config,
            modal={k: modal[k].detach().cpu().clone() for k in modal_keys},
            alpha=weights.alpha,
            beta=weights.beta,
            layer_alpha=dict(weights.layer_alpha),
            layer_beta=dict(weights.layer_beta),
            model_family=weights.model_family,
            condition_type=weights.condition_type,
            metadata=extra,
        )

    def save_checkpoint(step: int) -> str:
        from safetensors.torch import save_file

        paths = checkpoint_paths(checkpoint_dir, step)
        save_repcontrolnet(paths["weights"], snapshot(step))
        tensors, scalars = {}, {}
        for i, entry in opt.state_dict()["state"].items():
            for k, v in entry.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"state.{names[i]}.{k}"] = v.detach().cpu().contiguous()
                else:
                    scalars.setdefault(names[i], {})[k] = v
        tmp = paths["optimizer"] + ".tmp"
        save_file(tensors, tmp)
        os.replace(tmp, paths["optimizer"])
        _atomic_write_json(
            paths["state"],
            {
                "format": TRAIN_FORMAT,
                "version": 1,
                "step": step,
                "seed": seed,
                "lr": lr,
                "alpha": weights.alpha,
                "beta": weights.beta,
                "layers": layers,
                "adapter_config": adapter.config,
                "loss": loss if isinstance(loss, str) else "custom",
                "weights_file": os.path.basename(paths["weights"]),
                "optimizer_file": os.path.basename(paths["optimizer"]),
                "optimizer_scalars": scalars,
                "losses": losses,
            },
        )
        return paths["state"]

    last_ckpt = None
    step = start_step
    while step < steps:
        x0, cond, context = _unpack(batches.get(step))
        x0 = x0.to(device=device, dtype=torch.float32)
        cond = cond.to(device=device, dtype=torch.float32)
        gen = _step_generator(seed, step)
        idx = torch.randint(table.numel(), (x0.shape[0],), generator=gen)
        sigma = table[idx].to(device)
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(device)
        sigma_b = sigma.view(-1, *([1] * (x0.ndim - 1)))
        x_noisy = x0 + sigma_b * noise

        features = adapter(cond, latent_hw=x0.shape[-2:])
        merged = {}
        for k in modal_keys:
            a, b = coefs[k]
            merged[k] = merge_tensor(base[k], modal[k], a, b).to(param_dtype or base[k].dtype)
        denoised = unet_forward(merged, x_noisy, sigma, context, features)
        value = _loss_value(loss, denoised.float(), x0, noise, sigma_b, x_noisy)
        if not torch.isfinite(value):
            raise RuntimeError(f"RepControlNet training diverged at step {step + 1} (loss {value.item()}); lower lr")
        opt.zero_grad(set_to_none=True)
        value.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        step += 1
        v = float(value.detach().item())
        losses.append(v)
        if log_path is not None:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "loss": v}) + "\n")
        if checkpoint_dir is not None and checkpoint_every and step % checkpoint_every == 0:
            last_ckpt = save_checkpoint(step)
        if on_progress is not None:
            on_progress(step, v)

    if checkpoint_dir is not None and (last_ckpt is None or not last_ckpt.endswith(f"{step:07d}.json")):
        last_ckpt = save_checkpoint(step)
    return TrainResult(weights=snapshot(step), losses=losses, step=step, checkpoint=last_ckpt)
