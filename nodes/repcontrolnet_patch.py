"""The ComfyUI-facing patch objects of Apply RepControlNet (the node schemas live in nodes/repcontrolnet.py).

Merge: ``W' = W + s * ((alpha - 1) * W + beta * W_m)`` for every modal tensor, as ComfyUI weight-adapter patches
(``add_patches({key: RepControlNetMerge}, s)``). ComfyUI calls the adapter with the weight it is patching, when it
patches it (model load, CheckpointSave, or on every use for modules left on the lowvram/partial-load path), so the
only full-size tensors are ComfyUI's own (its working copy and the backup it restores on unpatch). The merge works in
place on ComfyUI's working copy; only a key that earlier patches touch holds one layer-sized increment, for the time
of that key's patch chain. No difference is ever stored per layer.

Ordering: the increment is computed from the model's own unpatched weight, wherever Apply sits among other weight
patches, and added at Apply's place in the chain. A LoRA before or after Apply keeps its full effect, and patches
that scale the weight (ModelMergeSimple's ``strength_model``) scale the increment only when they come after Apply:
exactly what adding a precomputed difference did. ComfyUI evaluates a key's patches in order starting from the
unpatched weight, so when the input MODEL already patches a key, a ``MergeCapture`` placed first in that key's list
computes the increment from the unpatched weight and hands it to ``RepControlNetMerge`` later in the same chain
(per thread). Without earlier patches the merge entry is first and computes it itself.

Adapter features: ``AdapterFeatures`` adds the condition adapter's output to the output of input block 0 (an
``input_block_patch``); ``RunScope`` (an OUTER_SAMPLE wrapper) gives it a fresh cache per sampling run.
"""

from __future__ import annotations

import threading

import comfy.weight_adapter
import torch

from ..magic_core import repcontrolnet as rcn
from ..magic_core.sharing import SharedOnCopy
from .common import NodeInputError

UNET_KEY_PREFIX = "diffusion_model."


class RepControlNetMerge(SharedOnCopy, comfy.weight_adapter.WeightAdapterBase):
    """Weight patch for every modal key of one Apply: adds ``strength * increment`` to the weight being patched.

    Immutable once built and shared by every clone that holds it (deep copies return it, the modal tensors are the
    loaded file's own)."""

    name = "magic_portrait_repcontrolnet"

    def __init__(self, terms: dict[str, rcn.MergeTerm], captured_keys: frozenset[str]):
        self.terms = terms
        self.captured_keys = captured_keys
        self.loaded_keys = set()
        self.weights = []
        self._local = threading.local()  # increments captured earlier in a chain, per thread

    def _captured(self) -> dict[str, torch.Tensor | None]:
        pending = getattr(self._local, "increments", None)
        if pending is None:
            pending = self._local.increments = {}
        return pending

    def capture(self, weight: torch.Tensor, key: str) -> None:
        pending = self._captured()
        pending.clear()  # a key's chain runs to its end before the next key's starts: anything left is from an aborted one
        pending[key] = rcn.merge_increment(weight, self.terms[key])

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        pending = self._captured()
        if key in self.captured_keys and key in pending:
            increment = pending.pop(key)
        elif offset is None:
            # first in the chain, so `weight` is the unpatched weight (ComfyUI's working copy); a plain key has no
            # conversion `function`, so merge in place: no temporary at all
            return rcn.merge_into_(weight, self.terms[key], strength)
        else:
            increment = rcn.merge_increment(weight, self.terms[key])
        if increment is None or strength == 0.0:
            return weight
        increment = increment.to(device=weight.device, dtype=weight.dtype)
        if strength != 1.0:
            increment.mul_(strength)
        weight += function(increment)
        return weight


class MergeCapture(SharedOnCopy, comfy.weight_adapter.WeightAdapterBase):
    """First patch of a key that other patches changed before Apply: computes the merge's increment from the
    unpatched weight it receives and returns that weight unchanged."""

    name = "magic_portrait_repcontrolnet_capture"

    def __init__(self, merge: RepControlNetMerge):
        self.merge = merge
        self.loaded_keys = set()
        self.weights = []

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        self.merge.capture(weight, key)
        return weight


def add_merge_patches(model, weights: rcn.RepControlNetWeights, strength: float) -> tuple[RepControlNetMerge, list]:
    """Add the merge to ``model`` (a clone the caller owns) at ``strength``; returns the patch and the keys added."""
    terms = rcn.merge_terms(weights, key_prefix=UNET_KEY_PREFIX)
    patched_before = frozenset(key for key in terms if model.patches.get(key))
    merge = RepControlNetMerge(terms, patched_before)
    added = model.add_patches(dict.fromkeys(terms, merge), strength)
    capture = MergeCapture(merge)
    for key in patched_before:
        # add_patches only appends; the capture must run before the patches already there
        model.patches[key].insert(0, (1.0, capture, 1.0, None, None))
    return merge, added


class AdapterFeatures(SharedOnCopy):
    """input_block_patch: adds the adapter's features to the output of input block 0.

    The adapter runs once per (latent size, device, dtype) and sampling run: an OUTER_SAMPLE wrapper clears the
    cache when a run starts and ends. Shared, not copied, when ComfyUI deep-copies model options."""

    def __init__(self, weights: rcn.RepControlNetWeights, condition: torch.Tensor, strength: float, node: str):
        self.weights = weights
        self.condition = condition  # (B, 3, H, W) in [0, 1], on the CPU
        self.strength = float(strength)
        self.node = node
        self.cache: dict[tuple, torch.Tensor] = {}
        self.adapters: dict[str, rcn.ConditionAdapter] = {}
        self.runs = 0  # adapter evaluations (tests check "once per run")
        self.lock = threading.Lock()

    def features(self, h: torch.Tensor) -> torch.Tensor:
        key = (tuple(h.shape[-2:]), str(h.device), h.dtype)
        with self.lock:
            found = self.cache.get(key)
            if found is None:
                adapter = self.adapters.get(str(h.device))
                if adapter is None:
                    adapter = self.weights.build_adapter(device=h.device, dtype=torch.float32)
                    self.adapters[str(h.device)] = adapter
                with torch.no_grad():
                    out = adapter(self.condition.to(h.device), latent_hw=h.shape[-2:], scale=self.strength)
                found = out.to(dtype=h.dtype)
                self.cache[key] = found
                self.runs += 1
            return found

    def clear(self) -> None:
        with self.lock:
            self.cache.clear()

    def __call__(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        if transformer_options.get("block") != ("input", 0):
            return h
        try:
            return rcn.add_features(h, self.features(h))
        except ValueError as err:
            raise NodeInputError(self.node, "image", str(err)) from None


class RunScope(SharedOnCopy):
    """OUTER_SAMPLE wrapper: a fresh feature cache for every sampling run (and none kept afterwards)."""

    def __init__(self, patch: AdapterFeatures):
        self.patch = patch

    def __call__(self, executor, *args, **kwargs):
        self.patch.clear()
        try:
            return executor(*args, **kwargs)
        finally:
            self.patch.clear()
