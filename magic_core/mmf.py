"""MagicID's training half as the pack reads it: Multi-Mode Fusion schedules, a MagicID dataset folder as a training
source, and Clone Face Tuning on the fly. Pure torch/numpy/PIL/OpenCV (never comfy); used by the Train RepControlNet
node and ``python -m magic_portrait train`` through the one loop in ``repcontrolnet_train``.

**Schedules** (``ModalitySchedule``, a ``condition_choice(seed, step) -> key`` for the loop, deterministic in
(seed, step) so every rank and every resume agree):

- ``single`` (default, today's behaviour): one key every step: ``"condition"`` (a pair folder's one condition; in a
  MagicID dataset the landmark image, which every sample has) or one named modality;
- ``alternate``: MMF's iteration, ``skeleton, landmark, skeleton, ...`` by step;
- ``random``: each step's modality drawn with ``modality_weights`` (``"skeleton=1, landmark=1"``) from a number
  derived from ``(seed, "modality", step)`` by ``train_data.derive_seed`` (no global random state);
- ``merged``: the merged condition every step (skeleton and landmarks drawn in one image, as
  ``magicid_dataset.draw_merged_condition`` draws it; in a pair folder a ``NAME_merged.png``).

``schedule.modalities`` are the trained modalities (written into the file as ``trained_modalities``; its
``description`` as ``training_conditions``). ``ModalityLog(schedule, seed)`` is the loop's ``log_extra``: each
loss-log line gets ``loss_<modality>_running``, the mean loss of that modality's last ``window`` steps (recomputed
from the loss history after a resume, so the log of a resumed run equals an uninterrupted one).

**One shared adapter** for every modality: MagicID trains one control branch and iterates the modalities of each
sample through it, so the pack trains one condition adapter and one set of modal weights on all of them; the file
then applies with a skeleton, a landmark or a merged condition alike.

**A MagicID dataset folder** (``dataset.json`` + ``manifest.jsonl``, see magicid_dataset) is a map-style source
(``MagicIDSource``): each picture, its conditions and its face mask cut to one square and resized to ``resolution``.
Where the square is cut (``crop``): ``random`` (default) draws the place from ``(seed, "crop_x"/"crop_y", step, slot)``,
so over a run every part of a wide group photo (or a tall portrait's head) is trained, the same on every rank and
resume; ``center`` cuts the middle every time, as pair folders are cut (and lets latents be cached). Key
``condition`` means the landmark image. A landmark-only sample (a photo kept without a skeleton) has no skeleton
and no merged condition: on such a step it trains with its landmark image (every sample has one; MMF's other
modality), and the source's ``describe()`` (the node's text, the file's ``training_data``) counts those samples.

**Clone Face Tuning** (``clone_face_probability`` > 0): the sample in slot k of step s is replaced, with that
probability, by ``clone_face.clone_face_sample`` of it (one face cloned to a free place, both conditions and the face
mask redrawn there); the decision comes from ``derive_seed(seed, "clone_face", s, k)``, the clone's plan from
``derive_seed(seed, "clone_face_plan", s, k)``, so resume and every split of the batch see the same samples. A
picture with no free place (a close-up) stays as it is. **Face-weighted loss** (``face_loss_weight`` λ > 0): the
sample's per-pixel loss weight is ``(1 + λ m) / mean(1 + λ m)`` with ``m`` the face mask cropped and resized as the
image (``clone_face.face_loss_weights`` with face weight 1 + λ, background 1): a face weighs 1 + λ times the
background, and each sample's weights average 1, so a batch stays a mean of its samples. 0 is the plain loss.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from . import train_data

SKELETON, LANDMARK, MERGED = "skeleton", "landmark", "merged"
MODALITIES = (SKELETON, LANDMARK, MERGED)
SCHEDULES = ("single", "alternate", "random", "merged")
CROPS = ("random", "center")  # where a MagicID picture is cut to the training square
APPLY_MODALITIES = ("any", SKELETON, LANDMARK, MERGED)
DEFAULT_WEIGHTS = "skeleton=1, landmark=1"
RUNNING_WINDOW = 10
_UNIT = float(1 << 63)  # derive_seed gives 63 bits: / 2**63 is a number in [0, 1)


class OptionError(ValueError):
    """A bad MMF / Clone Face Tuning option; ``option`` names it as the Train node's input (the command line's flag is
    ``--`` + the name with dashes), so both say which one without reading the message."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def unit_draw(seed: int, *parts) -> float:
    """A number in [0, 1) from the run seed and labels, the same on every rank and every resume."""
    return train_data.derive_seed(seed, *parts) / _UNIT


def parse_modality_weights(text: str | Mapping[str, float]) -> dict[str, float]:
    """``"skeleton=1, landmark=1"`` (commas, semicolons or new lines) -> {modality: weight}, in MODALITIES' order."""
    if isinstance(text, Mapping):
        items = [(str(k), v) for k, v in text.items()]
    else:
        items = []
        for part in re.split(r"[,;\n]", str(text)):
            if not part.strip():
                continue
            name, sep, value = part.partition("=")
            if not sep:
                raise OptionError("modality_weights",
                                  f"'{part.strip()}' is not modality=weight (e.g. {DEFAULT_WEIGHTS})")
            items.append((name.strip().lower(), value.strip()))
    weights: dict[str, float] = {}
    for name, value in items:
        if name not in MODALITIES:
            raise OptionError("modality_weights",
                              f"unknown modality '{name}': use {', '.join(MODALITIES)} (e.g. {DEFAULT_WEIGHTS})")
        if name in weights:
            raise OptionError("modality_weights", f"modality '{name}' is given twice")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise OptionError("modality_weights", f"the weight of '{name}' ({value!r}) is not a number") from None
        if not math.isfinite(number) or number < 0:
            raise OptionError("modality_weights", f"the weight of '{name}' must be a number >= 0, got {value!r}")
        weights[name] = number
    if not weights or sum(weights.values()) <= 0:
        raise OptionError("modality_weights",
                          f"modality weights must give at least one modality a weight > 0 (e.g. {DEFAULT_WEIGHTS})")
    return {m: weights[m] for m in MODALITIES if m in weights and weights[m] > 0}


class ModalitySchedule:
    """``schedule(seed, step) -> key``: the condition modality of every sample of a step (module docstring)."""

    def __init__(self, mode: str = "single", *, modality: str = train_data.CONDITION,
                 weights: str | Mapping[str, float] | None = None,
                 order: Sequence[str] = (SKELETON, LANDMARK)):
        if mode not in SCHEDULES:
            raise OptionError("modality_schedule",
                              f"modality schedule '{mode}' is unknown: use one of {', '.join(SCHEDULES)}")
        self.mode = mode
        self.weights: dict[str, float] = {}
        if mode == "single":
            self.order: tuple[str, ...] = (str(modality),)
        elif mode == "alternate":
            self.order = tuple(order)
            if len(self.order) < 2 or len(set(self.order)) != len(self.order):
                raise OptionError("modality_schedule",
                                  f"alternate needs two or more different modalities, got {list(self.order)}")
        elif mode == "random":
            self.weights = parse_modality_weights(DEFAULT_WEIGHTS if weights is None else weights)
            self.order = tuple(self.weights)
            total = sum(self.weights.values())
            self._edges = np.cumsum([self.weights[m] / total for m in self.order]).tolist()
        else:
            self.order = (MERGED,)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities a run with this schedule trains on."""
        return self.order

    @property
    def description(self) -> str:
        if self.mode == "single":
            return f"single: {self.order[0]}"
        if self.mode == "alternate":
            return "alternate: " + ", ".join(self.order) + ", ..."
        if self.mode == "random":
            return "random: " + ", ".join(f"{m}={w:g}" for m, w in self.weights.items())
        return "merged: skeleton + landmark in one image"

    def __call__(self, seed: int, step: int) -> str:
        if self.mode == "alternate":
            return self.order[int(step) % len(self.order)]
        if self.mode == "random":
            u = unit_draw(seed, "modality", int(step))
            for modality, edge in zip(self.order, self._edges, strict=True):
                if u < edge:
                    return modality
            return self.order[-1]
        return self.order[0]

    def __repr__(self) -> str:
        return f"ModalitySchedule({self.description})"


class ModalityLog:
    """``log_extra(step, losses)`` for the loop: ``loss_<modality>_running`` = the mean loss of the last ``window``
    steps of each modality seen so far (step counts from 0; ``losses`` is the run's history, resumed ones included)."""

    def __init__(self, schedule, seed: int, window: int = RUNNING_WINDOW):
        self.schedule, self.seed, self.window = schedule, int(seed), int(window)
        self._recent: dict[str, deque] = {}
        self._done = 0  # steps folded in

    def __call__(self, step: int, losses: Sequence[float]) -> dict:
        if step + 1 != len(losses):
            raise ValueError(f"log step {step} does not match a loss history of {len(losses)} steps")
        if self._done > step:  # another run: start over
            self._recent, self._done = {}, 0
        for s in range(self._done, step + 1):
            key = self.schedule(self.seed, s)
            self._recent.setdefault(key, deque(maxlen=self.window)).append(float(losses[s]))
        self._done = step + 1
        return {f"loss_{k}_running": sum(v) / len(v) for k, v in self._recent.items()}


# ---------------------------------------------------------------------------------------------- MagicID datasets


def fit_array(array: np.ndarray, size: int, mode: str = "RGB",
              centering: tuple[float, float] = (0.5, 0.5)) -> torch.Tensor:
    """A uint8 image array as ``train_data.load_image`` gives a file: cropped to a square (where: ``centering``, PIL's
    ``ImageOps.fit`` fractions; (0.5, 0.5) is the centre), resized (bicubic), (C, size, size) float32 in [0, 1]."""
    from PIL import Image, ImageOps

    img = Image.fromarray(np.ascontiguousarray(array)).convert(mode)
    img = ImageOps.fit(img, (int(size), int(size)), method=Image.Resampling.BICUBIC, centering=centering)
    out = torch.from_numpy(np.asarray(img, dtype=np.float32).copy() / 255.0)
    return out.unsqueeze(0) if out.ndim == 2 else out.permute(2, 0, 1).contiguous()


class MagicIDSource(train_data.SampleSource):
    """A MagicID dataset folder as a map-style training source (module docstring): ``skeleton``, ``landmark``,
    ``merged`` (and ``condition`` = landmark) per step; Clone Face Tuning and the face-weighted loss by option."""

    def __init__(self, folder, resolution: int = 512, *, clone_face_probability: float = 0.0,
                 face_loss_weight: float = 0.0, crop: str = "random", clone_options: Mapping | None = None):
        from . import magicid_dataset as md

        if resolution < 8 or resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
        if crop not in CROPS:
            raise OptionError("magicid_crop", f"crop '{crop}' is unknown: use one of {', '.join(CROPS)}")
        p, lam = float(clone_face_probability), float(face_loss_weight)
        if not (0.0 <= p <= 1.0):
            raise OptionError("clone_face_probability",
                              f"clone_face_probability must be in [0, 1], got {clone_face_probability!r}")
        if not (math.isfinite(lam) and lam >= 0):
            raise OptionError("face_loss_weight", f"face_loss_weight must be a number >= 0, got {face_loss_weight!r}")
        self.dataset = md.MagicIDDataset(folder)
        if len(self.dataset) == 0:
            raise ValueError(f"the MagicID dataset '{folder}' has no samples yet (build it with Build MagicID "
                             "Dataset)")
        self.folder = Path(folder)
        self.resolution = int(resolution)
        self.clone_face_probability = p
        self.face_loss_weight = lam
        self.clone_options = dict(clone_options or {})
        self.crop = crop
        # cloned or randomly cut pictures change from step to step: no latent cache then
        self.fixed_images = p == 0.0 and crop == "center"
        self.landmark_only = [r.name for r in self.dataset.records if SKELETON not in r.modalities]

    def __len__(self) -> int:
        return len(self.dataset)

    def modality_of(self, index: int, key: str) -> str:
        """The modality sample ``index`` trains with on a step of ``key`` (module docstring: the fallback)."""
        record = self.dataset.records[index]
        if key == train_data.CONDITION:
            return LANDMARK
        if key not in MODALITIES:
            raise ValueError(f"sample {record.name!r} of MagicID dataset '{self.folder.name}' has no '{key}' "
                             f"condition: a MagicID dataset has {', '.join(MODALITIES)}")
        if key in (SKELETON, MERGED) and SKELETON not in record.modalities:
            return LANDMARK
        return key

    def image(self, index: int) -> torch.Tensor:
        return fit_array(self.dataset[index].image, self.resolution)

    def centering(self, ref: train_data.SampleRef) -> tuple[float, float]:
        """Where ``ref``'s picture is cut to the square (``ImageOps.fit`` fractions): the centre, or a place drawn
        from (seed, step, slot) so that over the run every part of a wide group photo or a tall portrait is seen."""
        if self.crop == "center":
            return (0.5, 0.5)
        return (unit_draw(ref.seed, "crop_x", ref.step, ref.slot), unit_draw(ref.seed, "crop_y", ref.step, ref.slot))

    def clones(self, ref: train_data.SampleRef) -> bool:
        """Whether the sample in ``ref``'s slot of ``ref``'s step is a Clone Face Tuning sample."""
        return self.clone_face_probability > 0 and unit_draw(ref.seed, "clone_face", ref.step,
                                                             ref.slot) < self.clone_face_probability

    def magicid_sample(self, ref: train_data.SampleRef):
        """The MagicIDSample ``ref`` trains on (cloned when ``clones(ref)`` and the picture has room)."""
        from . import clone_face as cf

        sample = self.dataset[ref.index]
        if self.clones(ref):
            seed = train_data.derive_seed(ref.seed, "clone_face_plan", ref.step, ref.slot)
            cloned = cf.clone_face_sample(sample, seed, **self.clone_options)
            if cloned is not None:
                return cloned
        return sample

    def load(self, ref: train_data.SampleRef) -> dict:
        from . import clone_face as cf
        from . import magicid_dataset as md

        modality = self.modality_of(ref.index, ref.condition)
        sample = self.magicid_sample(ref)
        size, at = self.resolution, self.centering(ref)
        out = {"key": sample.name, "image": fit_array(sample.image, size, centering=at),
               "condition": fit_array(sample.condition(modality), size, centering=at)}
        if self.face_loss_weight > 0:
            mask = fit_array(md.mask_to_uint8(sample.face_mask), size, mode="L", centering=at)
            out["loss_weight"] = cf.face_loss_weights(mask[None], (size, size), face_weight=1.0 + self.face_loss_weight,
                                                      background_weight=1.0)[0]
        return out

    def describe(self) -> str:
        text = f"MagicID dataset '{self.folder.name}': {len(self)} samples at {self.resolution}px, {self.crop} crop"
        if self.landmark_only:
            text += (f" ({len(self.landmark_only)} landmark-only, trained with their landmark image on skeleton and "
                     f"merged steps: {', '.join(self.landmark_only[:5])}"
                     f"{' ...' if len(self.landmark_only) > 5 else ''})")
        if self.clone_face_probability > 0:
            text += f"; Clone Face Tuning p={self.clone_face_probability:g}"
        if self.face_loss_weight > 0:
            text += f"; face-weighted loss x{1 + self.face_loss_weight:g}"
        return text


# ---------------------------------------------------------------------------------------------- one run's options


def open_training_source(path, resolution: int, *, clone_face_probability: float = 0.0, face_loss_weight: float = 0.0,
                         crop: str = "random"):
    """``train_data.open_dataset`` that also knows MagicID folders; Clone Face Tuning and the face-weighted loss need
    one (they need the faces and masks of its manifest). ``crop`` applies to MagicID folders (other layouts are
    centre-cropped, as before)."""
    if train_data.is_magicid_folder(path):
        return MagicIDSource(path, resolution or 512, clone_face_probability=clone_face_probability,
                             face_loss_weight=face_loss_weight, crop=crop)
    if crop not in CROPS:
        raise OptionError("magicid_crop", f"crop '{crop}' is unknown: use one of {', '.join(CROPS)}")
    for name, value in (("clone_face_probability", clone_face_probability), ("face_loss_weight", face_loss_weight)):
        if float(value) != 0:
            raise OptionError(name,
                              f"{name} {value:g} needs a MagicID dataset folder (Build MagicID Dataset writes one: its "
                             f"faces and face masks); '{Path(path).name}' is not one: set it to 0")
    return train_data.open_dataset(path, resolution)


def make_schedule(mode: str, source, weights: str | None = None) -> ModalitySchedule:
    """The schedule of a run on ``source``; checks that a pair folder has the schedule's condition images."""
    if mode == "single" and isinstance(source, MagicIDSource):
        return ModalitySchedule(mode, modality=LANDMARK)  # every sample has one
    schedule = ModalitySchedule(mode, weights=weights)
    if mode != "single" and not isinstance(source, MagicIDSource):
        samples = getattr(source, "samples", None)
        if isinstance(samples, list) and samples and isinstance(samples[0], Mapping) and "conditions" in samples[0]:
            for entry in samples:
                missing = [m for m in schedule.modalities if m not in entry["conditions"]]
                if missing:
                    name = Path(str(entry.get("image", entry.get("key", "?")))).stem
                    raise OptionError("modality_schedule",
                                      f"modality schedule '{mode}' needs {', '.join(schedule.modalities)} conditions: "
                                      f"sample '{name}' has no {', '.join(missing)} image (name it "
                                      f"{name}_{missing[0]}.png), or use a MagicID dataset folder")
    return schedule


def loop_options(source, mode: str = "single", weights: str | None = None, seed: int = 0) -> dict:
    """``condition_choice`` and ``log_extra`` of the training loop for a modality schedule on ``source``; ``single``
    on a single-condition dataset gives neither (today's run, bit for bit)."""
    if mode == "single" and not isinstance(source, MagicIDSource):
        return {"condition_choice": None, "log_extra": None}
    schedule = make_schedule(mode, source, weights)
    return {"condition_choice": schedule, "log_extra": ModalityLog(schedule, seed)}


def trained_modalities(metadata: Mapping[str, str]) -> tuple[str, ...] | None:
    """The modalities a trained file records (None: a file that does not say, or one single-condition key)."""
    text = str(metadata.get("trained_modalities", "")).strip()
    found = tuple(m for m in (t.strip() for t in text.split(",")) if m)
    return found if found and all(m in MODALITIES for m in found) else None


def accepts(trained: Sequence[str], modality: str) -> bool:
    """Whether a file trained on ``trained`` accepts a condition of ``modality``: a trained one, or ``merged`` when it
    was trained on both skeleton and landmark (the merged image is both in one)."""
    return modality in trained or (modality == MERGED and SKELETON in trained and LANDMARK in trained)
