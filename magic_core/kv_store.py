"""KV Feature Store: the self-attention inputs recorded while inverting an image, for Feature Fusion Attention later.

Per (layer, sampling step) the store keeps the normalised hidden state ``n`` that enters attn1 (``[B, tokens, C]``),
not q, k and v: at use time ``q/k/v = to_q/to_k/to_v(n)`` are recomputed with the layer's own projections, which
costs a third of the memory (see ``qkv_equivalent_nbytes``).

- Steps are keyed by sigma. The store is created for one sampling schedule (descending sigmas; a trailing 0 is
  dropped), step ``i`` being the model call at ``sigmas[i]``. Lookups match a sigma with a relative tolerance of 1e-4.
  A step selection (explicit indices and/or a start-end percent of the steps) limits which steps are kept.
- Storage: dtype fp16 (default), bf16 or fp32, or 8 bits per element: ``int8`` (symmetric, one scale per token
  row: |x - deq(q(x))| <= scale / 2) or ``fp8_e4m3`` (float8 e4m3fn times one scale per token row: relative error
  <= 2^-4, absolute <= 2^-10 * scale near zero); scales are fp16 (``scale_dtype``), rounded up so no value clips.
  Recording quantises, ``get`` dequantises to the requested dtype/device. Device CPU (default, offloaded) or any
  torch device; a byte budget (scales counted) checked *before* a tensor is stored (``StoreBudgetError``).
- Plan: a store keeps only what a fusion will read. ``FeaturePlan`` (layers + step range, from a fusion preset or
  a user's choice) is what the KV Feature Store node records and what Feature Fusion Attention checks against
  (``KVStore.check_covers``): a layer or step the fusion needs and the store did not keep is a
  ``StoreCoverageError`` naming both nodes, never a silently skipped layer.
- Identity: ``model_id`` (opaque string from the caller: the checkpoint and architecture, weight patches such as
  LoRAs left out), ``weight_patches`` (opaque description of the weight patches the recording model carried, for
  notes), ``latent_shape`` (C, H, W), the schedule, the family. ``check_compatible`` raises ``StoreMismatchError``
  naming what differs. A content store must match the sampled latent's size; a style store only its channels
  (``check_compatible(..., channels_only=True)``): its keys and values need no spatial alignment.
- Batch: the store holds the content batch of B_s images (fixed by the first record). ``get`` maps it onto a
  sampling batch of B images per chunk (B_s == B: image i -> entry i; B_s == 1: broadcast) and, given ComfyUI's
  ``cond_or_uncond`` list, repeats it once per chunk: ComfyUI concatenates chunks of B rows each, so row
  ``j * B + i`` is image ``i`` of chunk ``j``.
- ``__deepcopy__``/``__copy__`` return self: ComfyUI deep-copies model_options and must not duplicate a store.

This module does not import ComfyUI.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from . import families
from .batch_rows import BatchRows
from .layers import LayerKey, format_layers, layer_info, normalize_family, tokens_at
from .sharing import SharedOnCopy

SIGMA_RTOL = 1e-4
DEFAULT_BUDGET_BYTES = 8 * 1024**3
FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# 8-bit formats: stored values times a per-token-row scale; QMAX is the largest stored magnitude
QUANTIZED_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: float(torch.finfo(torch.float8_e4m3fn).max)}
DTYPES = {**FLOAT_DTYPES, **QUANTIZED_DTYPES}
SCALE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32",
                  "float8_e4m3fn": "fp8_e4m3", "fp8": "fp8_e4m3", "e4m3": "fp8_e4m3"}


class StoreBudgetError(RuntimeError):
    """Storing another tensor would take the store past its byte budget."""


class StoreMismatchError(ValueError):
    """A store used with a model, latent size, schedule or batch it was not recorded for."""


class StoreCoverageError(StoreMismatchError):
    """A fusion asks for a layer or step its store did not keep."""


def storage_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"storage dtype must be one of {', '.join(DTYPES)}, got {dtype}")
        return dtype
    key = str(dtype).strip().lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"storage dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[key]


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in QMAX


def _round_up_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 `values` in `dtype`, rounded toward +inf (so a scale never shrinks and no scaled value clips)."""
    out = values.to(dtype)
    below = out.double() < values
    if bool(below.any()):
        out = torch.where(below, torch.nextafter(out, torch.full_like(out, math.inf)), out)
    return out


def quantize_rows(x: torch.Tensor, dtype: str | torch.dtype, scale_dtype: torch.dtype = torch.float16
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit quantisation with one scale per row (last dim): returns (values, scale [..., 1]).

    scale = max|row| / QMAX, rounded up in `scale_dtype`; values = x / scale rounded to the format (int8: nearest
    integer, |x - values * scale| <= scale / 2; float8 e4m3fn: nearest float8, relative error <= 2^-4 and absolute
    <= 2^-10 * scale below e4m3's smallest normal). An all-zero row gets scale 0. `x` is not modified.
    """
    fmt = storage_dtype(dtype)
    if not is_quantized(fmt):
        raise ValueError(f"quantize_rows needs an 8-bit format ({', '.join(QUANTIZED_DTYPES)}), got {dtype!r}")
    qmax = QMAX[fmt]
    xf = x.detach().float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("cannot quantise features holding inf or NaN")
    # float64 so that rounding up in the scale's dtype is exact; on the CPU (one value per row), as not every
    # device has float64
    ideal = amax.cpu().double() / qmax
    if bool((ideal > torch.finfo(scale_dtype).max).any()):
        raise ValueError(f"features up to {float(amax.max()):.3g} overflow a {scale_dtype} scale; store them in "
                         "fp32/bf16 or use fp32 scales")
    scale = _round_up_to(ideal, scale_dtype).to(x.device)
    divisor = torch.where(scale > 0, scale.float(), torch.ones_like(amax))
    scaled = (xf / divisor).clamp_(-qmax, qmax)  # the clamp only trims float32 division rounding
    values = scaled.round_().to(torch.int8) if fmt == torch.int8 else scaled.to(fmt)
    return values, scale


def dequantize_rows(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                    device: str | torch.device | None = None) -> torch.Tensor:
    """values * scale, computed in float32 (exact for int8/e4m3 values times an fp16 scale) and cast to `dtype`."""
    device = values.device if device is None else device
    out = values.to(device=device, dtype=torch.float32) * scale.to(device=device, dtype=torch.float32)
    return out.to(dtype)


def entry_nbytes(rows: int, channels: int, dtype: torch.dtype, scale_dtype: torch.dtype = torch.float16) -> int:
    """Bytes of `rows` token rows of `channels` stored in `dtype` (8-bit formats: plus one scale per row)."""
    scale = _element_size(scale_dtype) if is_quantized(dtype) else 0
    return int(rows) * (int(channels) * _element_size(dtype) + scale)


@dataclass(frozen=True)
class FeaturePlan:
    """What a fusion will read from a store: its layers and step range (``percent_steps`` of the schedule).

    `origin` says where the selection came from, for messages (e.g. "fusion preset 'magicstyle'"). The KV Feature
    Store keeps exactly this; Feature Fusion Attention checks the store against the layers and steps it fuses.
    """

    layers: tuple[LayerKey, ...]
    start_percent: float = 0.0
    end_percent: float = 1.0
    origin: str = ""

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(dict.fromkeys(_norm_key(k) for k in self.layers)))
        if not self.layers:
            raise ValueError("a feature plan needs at least one layer")
        percent_steps(1, self.start_percent, self.end_percent)  # validates the range

    def steps(self, n_steps: int) -> list[int]:
        return percent_steps(n_steps, self.start_percent, self.end_percent)

    def describe(self, n_steps: int | None = None) -> str:
        steps = (f"steps {_ranges_text(self.steps(n_steps))} of {n_steps}" if n_steps is not None
                 else f"steps {self.start_percent:g}-{self.end_percent:g} of the schedule")
        return f"layers {format_layers(self.layers)}, {steps}"


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def sigma_value(sigma) -> float:
    """A float from a sigma given as a number or a tensor (ComfyUI passes one sigma per batch row)."""
    if isinstance(sigma, torch.Tensor):
        if sigma.numel() == 0:
            raise ValueError("empty sigma tensor")
        return float(sigma.detach().reshape(-1)[0].item())
    return float(sigma)


def clean_schedule(sigmas) -> tuple[float, ...]:
    """A sampling schedule as descending floats without the trailing zero(s); ascending input is flipped."""
    if isinstance(sigmas, torch.Tensor):
        values = [float(s) for s in sigmas.detach().reshape(-1).tolist()]
    else:
        values = [float(s) for s in sigmas]
    if len(values) > 1 and values[0] < values[-1]:
        values = values[::-1]
    while values and values[-1] == 0.0:
        values.pop()
    if not values:
        raise ValueError("the sigma schedule is empty")
    if any(s <= 0 or not math.isfinite(s) for s in values):
        raise ValueError("schedule sigmas must be finite and positive (a 0 may only end the schedule)")
    return tuple(values)


def sigma_close(a: float, b: float, rtol: float = SIGMA_RTOL) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def find_sigma_index(sigma, schedule: Sequence[float], rtol: float = SIGMA_RTOL) -> int | None:
    """Index of `sigma` in `schedule` (relative tolerance), or None."""
    s = sigma_value(sigma)
    best, best_err = None, None
    for i, ref in enumerate(schedule):
        if sigma_close(s, ref, rtol):
            err = abs(s - ref)
            if best_err is None or err < best_err:
                best, best_err = i, err
    return best


def percent_steps(n_steps: int, start_percent: float = 0.0, end_percent: float = 1.0) -> list[int]:
    """Step indices i of an n-step schedule with start <= i/n < end (end 1.0 includes the last step).

    This is the step convention shared with FusionParams: MasaCtrl's "from step 4 of 50" is start_percent 0.08.
    """
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"need 0 <= start_percent <= end_percent <= 1, got {start_percent}, {end_percent}")
    eps = 1e-9
    return [i for i in range(n_steps) if i >= start_percent * n_steps - eps and i < end_percent * n_steps - eps]


def _norm_key(layer_key) -> LayerKey:
    if not (isinstance(layer_key, (tuple, list)) and len(layer_key) == 3):
        raise ValueError(f"layer key {layer_key!r} must be (block, number, transformer_index)")
    return (str(layer_key[0]), int(layer_key[1]), int(layer_key[2]))


def _fmt_key(layer_key: LayerKey) -> str:
    return f"{layer_key[0]} {layer_key[1]}:{layer_key[2]}"


class CaptureGate(SharedOnCopy):
    """A flag the inversion sampler opens on the one model call per sigma whose features should be recorded.

    ``set`` matches the inversion's ``set_capture(flag)`` callback. Deep copies return the same gate, so every copy
    of model_options ComfyUI makes still sees the sampler's flag.
    """

    __slots__ = ("open",)

    def __init__(self, open: bool = False):
        self.open = bool(open)

    def set(self, flag: bool) -> None:
        self.open = bool(flag)

    def __bool__(self) -> bool:
        return self.open

    def __repr__(self) -> str:
        return f"CaptureGate(open={self.open})"


class KVStore(SharedOnCopy):
    """Per (layer, step) attn1 input hidden states of an inverted image batch. See the module docstring."""

    def __init__(
        self,
        model_id: str,
        latent_shape: Sequence[int],
        sigmas,
        family: str,
        layers: Iterable[LayerKey],
        *,
        dtype: str | torch.dtype = "fp16",
        device: str | torch.device = "cpu",
        budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
        step_indices: Iterable[int] | None = None,
        start_percent: float = 0.0,
        end_percent: float = 1.0,
        inner_dims: Mapping[LayerKey, int] | None = None,
        label: str = "",
        weight_patches: str = "",
        scale_dtype: str | torch.dtype = "fp16",
        selected_by: str = "",
        origin: str = "",
    ):
        self.model_id = str(model_id)
        self.weight_patches = str(weight_patches)
        shape = tuple(int(s) for s in latent_shape)
        if len(shape) == 4:
            shape = shape[1:]
        if len(shape) != 3:
            raise ValueError(f"latent_shape must be (C, H, W) or (B, C, H, W), got {tuple(latent_shape)}")
        self.latent_shape: tuple[int, int, int] = shape
        self.sigmas: tuple[float, ...] = clean_schedule(sigmas)
        self.family = _maybe_family(family)
        self.layers: tuple[LayerKey, ...] = tuple(dict.fromkeys(_norm_key(k) for k in layers))
        if not self.layers:
            raise ValueError("a KV store needs at least one layer")
        self._layer_set = frozenset(self.layers)
        self.dtype = storage_dtype(dtype)
        self.quantized = is_quantized(self.dtype)
        self.scale_dtype = _scale_dtype(scale_dtype)
        self.device = torch.device(device)
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0 (or None for no budget)")
        self.budget_bytes = None if budget_bytes is None else int(budget_bytes)
        n = len(self.sigmas)
        kept = set(percent_steps(n, start_percent, end_percent))
        if step_indices is not None:
            wanted = {int(i) for i in step_indices}
            bad = sorted(i for i in wanted if not 0 <= i < n)
            if bad:
                raise ValueError(f"step indices {bad} are outside the {n}-step schedule (0-{n - 1})")
            kept &= wanted
        if not kept:
            raise ValueError(
                f"the step selection keeps no step of the {n}-step schedule "
                f"(start {start_percent}, end {end_percent}, indices {step_indices})"
            )
        self.step_indices: tuple[int, ...] = tuple(sorted(kept))
        self._kept = frozenset(kept)
        self.start_percent = float(start_percent)
        self.end_percent = float(end_percent)
        self.label = label
        self.selected_by = str(selected_by)  # the node whose inputs chose the layers/steps, for messages
        self.origin = str(origin)  # where that selection came from, e.g. "fusion preset 'magicstyle'"
        self.batch: int | None = None
        self._data: dict[tuple[LayerKey, int], torch.Tensor] = {}  # stored values (8-bit: before scaling)
        self._scales: dict[tuple[LayerKey, int], torch.Tensor] = {}  # 8-bit formats: [B, tokens, 1] per entry
        self._inner_dims: dict[LayerKey, int] = {_norm_key(k): int(v) for k, v in (inner_dims or {}).items()}
        self._nbytes = 0

    @classmethod
    def for_plan(cls, model_id: str, latent_shape: Sequence[int], sigmas, family: str, plan: FeaturePlan,
                 **kwargs) -> KVStore:
        """A store keeping exactly `plan`'s layers and steps (its origin kept for messages)."""
        return cls(model_id, latent_shape, sigmas, family, plan.layers, start_percent=plan.start_percent,
                   end_percent=plan.end_percent, origin=kwargs.pop("origin", plan.origin), **kwargs)

    @property
    def dtype_name(self) -> str:
        return _DTYPE_NAMES[self.dtype]

    # ----------------------------------------------------------------- identity
    @property
    def n_steps(self) -> int:
        return len(self.sigmas)

    def step_index(self, sigma) -> int | None:
        """Index of `sigma` in the store's schedule (relative tolerance 1e-4), or None."""
        return find_sigma_index(sigma, self.sigmas)

    def check_compatible(self, model_id: str | None, latent_shape: Sequence[int] | None, sigmas=None,
                         who: str = "this node", channels_only: bool = False) -> None:
        """Raise StoreMismatchError naming what differs between the store and its intended use (None: not checked).

        `channels_only`: of the latent shape check only the channel count (a style store: any size and aspect)."""
        name = f"KV store{' ' + repr(self.label) if self.label else ''}"
        if model_id is not None and str(model_id) != self.model_id:
            raise StoreMismatchError(
                f"{who}: the {name} was recorded with model {self.model_id!r} but is used with model {model_id!r}. "
                "Stored features only fit the checkpoint that produced them (weight patches such as LoRAs may "
                "differ): connect the same checkpoint's MODEL to the inversion and to this node, or re-run the "
                "inversion with this model."
            )
        if latent_shape is not None:
            shape = tuple(int(s) for s in latent_shape)
            shape = shape[1:] if len(shape) == 4 else shape
            c, h, w = self.latent_shape
            if len(shape) != 3:
                raise ValueError(f"latent_shape must be (C, H, W) or (B, C, H, W), got {tuple(latent_shape)}")
            if shape[0] != c:
                raise StoreMismatchError(
                    f"{who}: the {name} was recorded on a {c}-channel latent but this latent has {shape[0]} "
                    "channels: it belongs to another model family; encode the image with this model's VAE."
                )
            if not channels_only and shape[1:] != (h, w):
                raise StoreMismatchError(
                    f"{who}: latent size differs: the {name} was recorded at {h}x{w} (HxW latent, about "
                    f"{h * 8}x{w * 8} px) but this latent is {shape[1]}x{shape[2]} (about {shape[1] * 8}x"
                    f"{shape[2] * 8} px). The content's features must match the latent being sampled: sample the "
                    "inverted content latent (same image size), or re-run the content's inversion at this size."
                )
        if sigmas is not None:
            other = clean_schedule(sigmas)
            if len(other) != len(self.sigmas):
                raise StoreMismatchError(
                    f"{who}: schedule length differs: the {name} was recorded on {len(self.sigmas)} steps but "
                    f"this schedule has {len(other)}. Use the same scheduler, steps and denoise/strength as the "
                    "inversion (or feed the inversion's sampling_sigmas)."
                )
            for i, (a, b) in enumerate(zip(self.sigmas, other, strict=True)):
                if not sigma_close(a, b):
                    raise StoreMismatchError(
                        f"{who}: schedule values differ: at step {i} the {name} has sigma {a:.6g} but this "
                        f"schedule has {b:.6g}. Use the same scheduler, steps and denoise/strength as the "
                        "inversion (or feed the inversion's sampling_sigmas)."
                    )

    def check_covers(self, layers: Iterable[LayerKey], steps: Iterable[int], fusion: str = "the fusion",
                     hint: str = "") -> None:
        """Raise StoreCoverageError naming both sides when `fusion` would read a layer or step this store did not
        keep (a fusion never silently skips a layer). `steps` are indices of the store's schedule."""
        lacking_layers = [k for k in (_norm_key(x) for x in layers) if k not in self._layer_set]
        lacking_steps = sorted({int(i) for i in steps} - self._kept)
        if not lacking_layers and not lacking_steps:
            return
        wanted = []
        if lacking_layers:
            wanted.append(f"layers {format_layers(lacking_layers)}")
        if lacking_steps:
            wanted.append(f"steps {_ranges_text(lacking_steps)} of {self.n_steps}")
        name = f"KV store{' ' + repr(self.label) if self.label else ''}"
        origin = f" ({self.origin})" if self.origin else ""
        raise StoreCoverageError(
            f"the {name} does not hold {' and '.join(wanted)}, which {fusion} fuses: "
            f"{self.selected_by or 'the KV Feature Store'} kept layers {format_layers(self.layers)} at steps "
            f"{_ranges_text(self.step_indices)} of {self.n_steps}{origin}. "
            + (hint or "Make the store keep what the fusion reads (its layers and start/end percent), or fuse only "
               "what the store kept.")
        )

    # ----------------------------------------------------------------- capture
    def record(self, layer_key, sigma, n: torch.Tensor, cond_or_uncond: Sequence[int] | None = None,
               inner_dim: int | None = None) -> bool:
        """Keep `n` ([B, tokens, C]) for this layer and sigma; returns False when the layer/step is not selected.

        With `cond_or_uncond` of several chunks, one chunk is kept: the first positive (0) chunk, else the first.
        The tensor is detached, cast to the storage dtype and copied to the storage device. The budget is checked
        before anything is stored. A sigma outside the store's schedule is an error.
        """
        key = _norm_key(layer_key)
        if key not in self._layer_set:
            return False
        idx = self.step_index(sigma)
        if idx is None:
            raise StoreMismatchError(
                f"KV store: sigma {sigma_value(sigma):.6g} is not in the schedule the store was created for "
                f"({len(self.sigmas)} steps, {self.sigmas[0]:.6g} .. {self.sigmas[-1]:.6g}); create the store with "
                "the schedule the inversion runs on"
            )
        if idx not in self._kept:
            return False
        if not isinstance(n, torch.Tensor) or n.ndim != 3:
            raise ValueError(f"record expects a [B, tokens, C] tensor, got {getattr(n, 'shape', type(n))}")
        n = n[BatchRows.of(n.shape[0], cond_or_uncond).kept_chunk()]
        if self.batch is None:
            self.batch = int(n.shape[0])
        elif n.shape[0] != self.batch:
            raise StoreMismatchError(
                f"KV store: {_fmt_key(key)} got a batch of {n.shape[0]} but earlier records hold {self.batch} images"
            )
        new_bytes = entry_nbytes(n.shape[0] * n.shape[1], n.shape[2], self.dtype, self.scale_dtype)
        old_bytes = self._entry_nbytes((key, idx))
        total = self._nbytes - old_bytes + new_bytes
        if self.budget_bytes is not None and total > self.budget_bytes:
            raise StoreBudgetError(
                f"KV store budget exceeded: storing {_fmt_key(key)} at step {idx} (sigma {self.sigmas[idx]:.4g}, "
                f"{new_bytes:,} bytes) needs {total:,} bytes ({human_bytes(total)}) in total, over the budget of "
                f"{self.budget_bytes:,} bytes ({human_bytes(self.budget_bytes)}). Store fewer layers (a smaller "
                f"layer preset), fewer steps (start/end percent), fewer images, " + self._smaller_dtype_hint()
                + "or raise the budget."
            )
        if self.quantized:  # quantised where the features are (less to move), then moved
            values, scale = quantize_rows(n, self.dtype, self.scale_dtype)
            self._data[(key, idx)] = values.to(self.device)
            self._scales[(key, idx)] = scale.to(self.device)
        else:
            self._data[(key, idx)] = n.detach().to(device=self.device, dtype=self.dtype, copy=True)
        self._nbytes = total
        if inner_dim is not None:
            self._inner_dims[key] = int(inner_dim)
        return True

    # ----------------------------------------------------------------- lookup
    def get(self, layer_key, sigma, device=None, dtype=None, *, batch: int | None = None,
            cond_or_uncond: Sequence[int] | None = None) -> torch.Tensor:
        """The stored `n` for this layer and sigma, on `device` in `dtype` (8-bit stores: dequantised, by default
        to float32).

        `batch`: the per-chunk batch size B to map the stored B_s images onto (B_s == B or B_s == 1); default B_s.
        `cond_or_uncond`: ComfyUI's chunk list; the result then has len(cond_or_uncond) * B rows, the mapped batch
        repeated once per chunk. Without it the result has B rows. Raises KeyError when nothing was recorded.
        """
        key = _norm_key(layer_key)
        idx = self.step_index(sigma)
        t = None if idx is None else self._data.get((key, idx))
        if t is None:
            where = "not in the store's schedule" if idx is None else f"step {idx} of {self.n_steps}"
            raise KeyError(
                f"KV store has no features for {_fmt_key(key)} at sigma {sigma_value(sigma):.6g} ({where}); "
                f"it holds layers {format_layers(self.recorded_layers()) or 'none'} at steps "
                f"{list(self.recorded_steps())}. Make the store's layers and step range cover where fusion is applied."
            )
        if self.quantized:
            t = dequantize_rows(t, self._scales[(key, idx)], dtype if dtype is not None else torch.float32, device)
        else:
            t = t.to(device=device if device is not None else t.device, dtype=dtype if dtype is not None else t.dtype)
        rows = BatchRows.per_image(t.shape[0] if batch is None else int(batch), cond_or_uncond)
        if not rows.accepts(t.shape[0]):
            raise StoreMismatchError(
                f"KV store holds {t.shape[0]} images but the sampling batch has {rows.per_chunk} per cond/uncond "
                f"chunk: use a batch of {t.shape[0]}, or a store of one image (it is then shared by every image)"
            )
        return rows.source_rows(t, broadcast=False)

    def tokens(self, layer_key) -> int | None:
        """Token count of the recorded hidden states at this layer (None when nothing is recorded there)."""
        key = _norm_key(layer_key)
        for i in self.step_indices:
            t = self._data.get((key, i))
            if t is not None:
                return int(t.shape[1])
        return None

    def recorded_layers(self) -> list[LayerKey]:
        return [k for k in self.layers if any((k, i) in self._data for i in self.step_indices)]

    def recorded_steps(self) -> list[int]:
        return sorted({i for (_, i) in self._data})

    def missing(self) -> list[tuple[LayerKey, int]]:
        """Selected (layer, step) pairs not recorded (an inversion that never hit a layer leaves them empty)."""
        return [(k, i) for k in self.layers for i in self.step_indices if (k, i) not in self._data]

    # ----------------------------------------------------------------- memory
    def _entry_nbytes(self, entry: tuple[LayerKey, int]) -> int:
        values, scale = self._data.get(entry), self._scales.get(entry)
        return sum(t.numel() * t.element_size() for t in (values, scale) if t is not None)

    @property
    def nbytes(self) -> int:
        """Exact bytes of all stored tensors (8-bit formats: values and their scales)."""
        return sum(t.numel() * t.element_size() for part in (self._data, self._scales) for t in part.values())

    def qkv_equivalent_nbytes(self, inner_dims: Mapping[LayerKey, int] | None = None,
                              dtype: str | torch.dtype | None = None) -> int:
        """Bytes that storing q, k and v instead of `n` would take: 3 * B * tokens * inner_dim per entry, in `dtype`
        (default the store's own format; 8-bit formats count one scale per token row of each of q, k and v).

        inner_dim per layer: `inner_dims` given here, else the one given at record/construction, else C of `n`
        (attn1 of SD1.5/SDXL projects C -> heads * dim_head = C).
        """
        fmt = self.dtype if dtype is None else storage_dtype(dtype)
        extra = {_norm_key(k): int(v) for k, v in (inner_dims or {}).items()}
        total = 0
        for (key, _), t in self._data.items():
            inner = extra.get(key, self._inner_dims.get(key, t.shape[-1]))
            total += 3 * entry_nbytes(t.shape[0] * t.shape[1], inner, fmt, self.scale_dtype)
        return total

    def planned_nbytes(self, batch: int = 1, tokens_channels: Mapping[LayerKey, tuple[int, int]] | None = None) -> int:
        """Bytes a full recording of the selected layers and steps will take, for `batch` images.

        `tokens_channels`: {layer: (tokens, channels)}; default from the family's layer table and latent size.
        """
        per_step = 0
        _, h, w = self.latent_shape
        for key in self.layers:
            if tokens_channels is not None and key in tokens_channels:
                tokens, channels = tokens_channels[key]
            else:
                if self.family not in families.LAYER_TABLE_FAMILIES:
                    raise ValueError(f"no layer table for family {self.family!r}: pass tokens_channels")
                gh, gw = tokens_at(self.family, key[0], key[1], h, w)
                tokens, channels = gh * gw, layer_info(self.family, key[0], key[1]).channels
            per_step += entry_nbytes(tokens, channels, self.dtype, self.scale_dtype)
        return per_step * len(self.step_indices) * int(batch)

    def check_plan(self, batch: int = 1, tokens_channels: Mapping[LayerKey, tuple[int, int]] | None = None) -> int:
        """Raise StoreBudgetError before an inversion starts if a full recording cannot fit; returns the plan."""
        need = self.planned_nbytes(batch, tokens_channels)
        if self.budget_bytes is not None and need > self.budget_bytes:
            raise StoreBudgetError(
                f"KV store budget too small: {len(self.layers)} layers x {len(self.step_indices)} steps x {batch} "
                f"image(s) in {self.dtype_name} need {need:,} bytes ({human_bytes(need)}), over the budget "
                f"of {self.budget_bytes:,} bytes ({human_bytes(self.budget_bytes)}). Store fewer layers (a smaller "
                "layer preset), fewer steps (start/end percent), fewer images, " + self._smaller_dtype_hint()
                + "or raise the budget."
            )
        return need

    def _smaller_dtype_hint(self) -> str:
        if self.dtype == torch.float32:
            return f"fp16 storage (now {self.dtype_name}) or 8-bit storage (int8, fp8_e4m3), "
        if not self.quantized:
            return "8-bit storage (int8 or fp8_e4m3), "
        return ""

    def clear(self) -> None:
        self._data.clear()
        self._scales.clear()
        self._nbytes = 0
        self.batch = None

    # ----------------------------------------------------------------- misc
    def summary(self) -> str:
        return (
            f"{self.label + ': ' if self.label else ''}{len(self.recorded_layers())}/{len(self.layers)} layers x "
            f"{len(self.recorded_steps())}/{len(self.step_indices)} steps, {self.batch or 0} image(s), "
            f"{human_bytes(self.nbytes)} {self.dtype_name} on {self.device} "
            f"(q/k/v would take {human_bytes(self.qkv_equivalent_nbytes())})"
        )

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return (f"KVStore(model_id={self.model_id!r}, family={self.family!r}, latent_shape={self.latent_shape}, "
                f"steps={self.n_steps}, entries={len(self._data)}, nbytes={self.nbytes})")


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _scale_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in SCALE_DTYPES.values():
        return dtype
    key = _DTYPE_ALIASES.get(str(dtype).strip().lower(), str(dtype).strip().lower())
    if key not in SCALE_DTYPES:
        raise ValueError(f"scale dtype must be one of {', '.join(SCALE_DTYPES)}, got {dtype!r}")
    return SCALE_DTYPES[key]


def _ranges_text(values: Iterable[int]) -> str:
    """Sorted integers as compact ranges: [0, 1, 2, 5] -> '0-2, 5'."""
    out, run = [], []
    for v in sorted(set(values)):
        if run and v == run[-1] + 1:
            run.append(v)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [v]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out) or "none"


def _maybe_family(family: str) -> str:
    try:
        return normalize_family(family)
    except ValueError:
        return str(family)
