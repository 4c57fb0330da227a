"""Training data: sample sources, the deterministic sample order, and loading in worker processes. Pure torch/PIL.

A **sample** is a dict of CPU tensors for one training example:

- ``"latent"`` (C, h, w): a VAE latent as ``vae.encode`` returns it (not yet scaled by the latent format), or
  ``"image"`` (3, H, W) in [0, 1], to be encoded by the caller's ``prepare_batch`` in the main process;
- ``"condition"`` (3, H, W) in [0, 1]: the condition image of the modality chosen for the step (see below);
- optional ``"loss_weight"`` (1, H, W) or (1, h, w), >= 0: a per-pixel weight of the loss (resized to the latent);
- optional ``"conditioning"``: the sample's own prompt conditioning in ComfyUI's format (core's training datasets);
- ``"key"``: a name for error messages. Keys starting with ``_`` are bookkeeping.

**The order** is a function of the run's seed, never of the world size or the number of loader workers:

- map-style sources (``SampleSource``: a folder of pairs, core's ``SaveTrainingDataset`` shards, a list) form an
  endless stream of *positions*; position ``p`` is sample ``order(epoch)[p % n]`` of epoch ``p // n``, where
  ``order`` is a permutation drawn from ``(seed, epoch)``. Step ``s`` of a run with global batch ``G`` takes
  positions ``[s G, (s + 1) G)`` (continuing from the positions a resumed checkpoint had consumed). Its ``G`` slots
  are laid out micro-batch by micro-batch: slot ``m W b + r b + i`` is sample ``i`` of micro-batch ``m`` on rank
  ``r`` (``W`` ranks, ``b`` samples per micro-batch). So every rank reads a disjoint part of each epoch, and a run on
  ``W`` ranks with batch ``b`` sees exactly the samples (and, keyed by slot, the noise) of one rank with batch ``W b``.
- streaming sources (``train_streams.TarShards``: webdataset-layout ``.tar`` files, too many samples to list) are
  split by shard: in epoch ``e`` rank ``r`` reads shards ``perm(seed, e)[r::W]`` in turn, sample after sample. A rank's
  position (epoch, remaining shards, offset in the current one) is saved with each checkpoint; a resume on the
  same world size continues every rank exactly; on another world size the unread remainder of the interrupted
  epoch is dealt out to the new ranks (no sample skipped or read twice, but in another order).

**The condition** of a step is chosen by ``condition_choice(seed, step) -> key`` (default: always
``"condition"``); a source loads that modality for every sample of the step (``NAME_<key>.png`` beside a pair's
image, ``<key>.png`` in a tar sample, ``conditions/<index>_<key>.png`` beside core shards). The choice is made
where the samples are planned, so it is the same on every rank and on resume.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # train_streams builds on this module; it is imported where a stream is opened
    from .train_streams import TarShards

CONDITION = "condition"  # the default condition key (a single modality)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CONDITION_SUFFIXES = ("_condition", "_cond", "_control")  # NAME_<suffix>.png = NAME.png's condition (key "condition")
LOSS_WEIGHT = "loss_weight"
CORE_SHARD_RE = re.compile(r"^shard_(\d+)\.pkl$")
MAGICID_INFO = "dataset.json"  # magicid_dataset.INFO_FILE: a MagicID dataset folder

ConditionChoice = Callable[[int, int], str]  # (seed, step) -> condition key


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from the run seed and labels (step, slot, epoch ...): independent streams, stable everywhere."""
    text = ":".join(str(p) for p in (int(seed), *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *parts: Any) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *parts))


def single_condition(seed: int, step: int) -> str:
    """The default condition choice: the sample's one condition, every step."""
    return CONDITION


@dataclass(frozen=True)
class SampleRef:
    """What a worker needs to load one sample: its index (map-style; -1 in a stream), its position in the run's
    stream (seeds augmentation: ``derive_seed(seed, "sample", position)``), the step and slot it serves, and the
    condition key chosen for that step."""

    index: int
    position: int
    step: int
    slot: int
    condition: str
    seed: int

    @property
    def sample_seed(self) -> int:
        if self.position >= 0:
            return derive_seed(self.seed, "sample", self.position)
        return derive_seed(self.seed, "stream", self.step, self.slot)  # streams have no global position


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's global batch is split: ``world_size`` ranks x ``accumulation`` micro-batches of
    ``batch_size`` samples; this process is ``rank``."""

    world_size: int = 1
    rank: int = 0
    batch_size: int = 1
    accumulation: int = 1

    def __post_init__(self):
        for name in ("world_size", "batch_size", "accumulation"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accumulation

    def slots(self, micro: int) -> range:
        """Slots of the global batch that this rank's micro-batch ``micro`` holds."""
        start = micro * self.world_size * self.batch_size + self.rank * self.batch_size
        return range(start, start + self.batch_size)


# ------------------------------------------------------------------------------------------------------ images


def load_image(source, size: int | tuple[int, int] | None = None, *, mode: str = "RGB") -> torch.Tensor:
    """(C, H, W) float32 in [0, 1] from a path or bytes: EXIF-rotated, converted to ``mode`` ("RGB" or "L"), and,
    when ``size`` is given (an int for a square, or (height, width)), centre-cropped to that aspect and resized."""
    import numpy as np
    from PIL import Image, ImageOps

    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with Image.open(handle) as img:
        img = ImageOps.exif_transpose(img).convert(mode)
        if size is not None:
            h, w = (size, size) if isinstance(size, int) else size
            img = ImageOps.fit(img, (int(w), int(h)), method=Image.Resampling.BICUBIC)
        array = np.asarray(img, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def condition_key_of(stem: str, image_stems: Iterable[str]) -> tuple[str, str] | None:
    """(image stem, condition key) when ``stem`` names a condition of one of ``image_stems``: ``NAME_condition`` /
    ``_cond`` / ``_control`` -> key "condition"; ``NAME_<key>`` -> key."""
    stems = set(image_stems)
    for suffix in CONDITION_SUFFIXES:
        if stem.endswith(suffix) and stem[: -len(suffix)] in stems:
            return stem[: -len(suffix)], CONDITION
    for cut in range(len(stem) - 1, 0, -1):  # the longest image name followed by "_": keys may hold "_" too
        if stem[cut] == "_" and stem[:cut] in stems:
            return stem[:cut], stem[cut + 1:]
    return None


def find_pairs(folder: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, condition) pairs of a dataset folder: ``images/NAME.ext`` + ``conditions/NAME.ext`` (matched by file
    stem), or, in one flat folder, ``NAME.ext`` + ``NAME_condition.ext`` (also ``_cond`` / ``_control``)."""
    return [(s["image"], s["conditions"][CONDITION]) for s in find_pair_samples(folder) if CONDITION in s["conditions"]]


def find_pair_samples(folder: str | os.PathLike) -> list[dict]:
    """Samples of a pairs folder: ``[{"key", "image": path, "conditions": {key: path}, "loss_weight": path?}]``.

    ``images/NAME.ext`` + ``conditions/NAME.ext`` (key "condition") and ``conditions/NAME_<key>.ext``; or one flat
    folder with ``NAME.ext`` beside ``NAME_condition.ext`` (``_cond``, ``_control``) and ``NAME_<key>.ext`` for more
    modalities; ``NAME_loss_weight.ext`` is a per-pixel loss weight. An image without any condition is left out."""
    root = Path(folder)

    def images(d: Path) -> dict[str, Path]:
        return {p.stem: p for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()}

    samples: dict[str, dict] = {}
    if (root / "images").is_dir() and (root / "conditions").is_dir():
        pics, conds = images(root / "images"), images(root / "conditions")
        for stem, path in pics.items():
            samples[stem] = {"key": stem, "image": path, "conditions": {}}
            if stem in conds:
                samples[stem]["conditions"][CONDITION] = conds[stem]
        for stem, path in conds.items():
            found = condition_key_of(stem, pics) if stem not in pics else None
            if found is not None:
                _attach(samples[found[0]], found[1], path)
    else:
        found_images = images(root)
        owners = {}
        for stem in found_images:
            found = condition_key_of(stem, found_images)
            if found is not None and found[0] != stem:
                owners[stem] = found
        for stem, path in found_images.items():
            if stem not in owners:
                samples[stem] = {"key": stem, "image": path, "conditions": {}}
        for stem, (owner, key) in owners.items():
            if owner in samples:
                _attach(samples[owner], key, found_images[stem])
    return [s for _, s in sorted(samples.items()) if s["conditions"]]


def _attach(sample: dict, key: str, path: Path) -> None:
    if key == LOSS_WEIGHT:
        sample["loss_weight"] = path
    else:
        sample["conditions"].setdefault(key, path)


# ----------------------------------------------------------------------------------------------- map-style sources


class SampleSource:
    """A map-style training set: ``len()`` samples, ``load(ref)`` -> sample dict. Override ``epoch_order`` to keep
    locality (core shards); ``describe()`` goes into the trained file's metadata. ``fixed_images``: True when a
    sample's image never changes (no augmentation), so its VAE latent may be cached."""

    fixed_images = False  # when True, also give the source an ``image(index)`` method

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, ref: SampleRef) -> dict:
        raise NotImplementedError

    def epoch_order(self, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
        n = len(self)
        if not shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=generator(seed, "epoch", epoch))

    def describe(self) -> str:
        return f"{type(self).__name__} of {len(self)} samples"


class InMemorySamples(SampleSource):
    """Samples already in memory (dicts as described above, one condition or ``conditions: {key: tensor}``)."""

    def __init__(self, samples: Sequence[Mapping]):
        if len(samples) == 0:
            raise ValueError("no training samples")
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, ref: SampleRef) -> dict:
        sample = dict(self.samples[ref.index])
        conditions = sample.pop("conditions", None)
        if conditions is not None:
            if ref.condition not in conditions:
                raise ValueError(f"sample {sample.get('key', ref.index)} has no '{ref.condition}' condition "
                                 f"(it has {sorted(conditions)})")
            sample["condition"] = conditions[ref.condition]
        elif ref.condition != CONDITION:
            raise ValueError(f"sample {sample.get('key', ref.index)} has no '{ref.condition}' condition (it has one "
                             f"condition image; give it conditions={{key: image}} for several)")
        sample.setdefault("key", str(ref.index))
        return sample


class PairFolderSamples(SampleSource):
    """Image + condition files (``find_pair_samples``), centre-cropped and resized to ``resolution`` squares."""

    fixed_images = True  # a sample's image is the same every epoch: its latent may be cached

    def __init__(self, samples: Sequence[Mapping], resolution: int):
        if not samples:
            raise ValueError("no (image, condition) pairs")
        if resolution < 8 or resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
        self.samples = [dict(s) for s in samples]
        self.resolution = int(resolution)

    @classmethod
    def from_folder(cls, folder, resolution: int) -> PairFolderSamples:
        return cls(find_pair_samples(folder), resolution)

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> torch.Tensor:
        """Sample ``index``'s image alone (3, H, W), e.g. to encode every latent before training."""
        return load_image(self.samples[index]["image"], self.resolution)

    def load(self, ref: SampleRef) -> dict:
        entry = self.samples[ref.index]
        path = entry["conditions"].get(ref.condition)
        if path is None:
            raise ValueError(f"{entry['image']} has no '{ref.condition}' condition image (it has "
                             f"{sorted(entry['conditions'])}; name it {Path(entry['image']).stem}_{ref.condition}.png)")
        size = self.resolution
        sample = {"key": str(entry["key"]), "image": load_image(entry["image"], size),
                  "condition": load_image(path, size)}
        if entry.get("loss_weight") is not None:
            sample["loss_weight"] = load_image(entry["loss_weight"], size, mode="L")
        return sample

    def describe(self) -> str:
        return f"{len(self)} pairs of image + condition at {self.resolution}px"


class CoreDatasetSamples(SampleSource):
    """A dataset written by ComfyUI's SaveTrainingDataset (``shard_NNNN.pkl`` holding ``{"latents": [{"samples":
    (1, C, h, w)}], "conditioning": [[[cond, {...}]]]}``, plus ``metadata.json``): pre-encoded latents and each
    sample's own prompt conditioning, read with ``torch.load(weights_only=True)``. Condition images sit beside the
    shards in ``conditions/``, named by the sample's index in shard order (``conditions/000012.png``, any zero
    padding; ``conditions/000012_<key>.png`` for other modalities, ``_loss_weight`` for a loss weight); they are
    resized to the latent's size x 8. Each worker keeps the last ``cache_shards`` shards it read; ``epoch_order``
    shuffles shards, then samples within each, so a worker reads each shard about once per epoch."""

    def __init__(self, folder, *, cache_shards: int = 2):
        self.folder = Path(folder)
        self.shards = sorted((p for p in self.folder.iterdir() if CORE_SHARD_RE.match(p.name)),
                             key=lambda p: int(CORE_SHARD_RE.match(p.name).group(1)))
        if not self.shards:
            raise ValueError(f"no shard_NNNN.pkl files in '{self.folder}' (write them with ComfyUI's "
                             "SaveTrainingDataset)")
        self.cache_shards = max(1, int(cache_shards))
        self._cache: dict[int, dict] = {}
        self.sizes = self._shard_sizes()
        self.starts = [0]
        for n in self.sizes:
            self.starts.append(self.starts[-1] + n)
        self.conditions = self._condition_files()

    def _shard_sizes(self) -> list[int]:
        meta_path = self.folder / "metadata.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            total, size = int(meta.get("num_samples", -1)), int(meta.get("shard_size", 0))
            if size > 0 and int(meta.get("num_shards", -1)) == len(self.shards) and total >= 0:
                sizes = [size] * (len(self.shards) - 1)
                sizes.append(total - size * (len(self.shards) - 1))
                if sizes[-1] > 0:
                    return sizes
        return [len(self._read_shard(i)["latents"]) for i in range(len(self.shards))]

    def _condition_files(self) -> dict[int, dict[str, Path]]:
        folder = self.folder / "conditions"
        found: dict[int, dict[str, Path]] = {}
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                head, _, key = path.stem.partition("_")
                if head.isdigit():
                    found.setdefault(int(head), {})[key or CONDITION] = path
        if not found:
            raise ValueError(f"no condition images beside the shards in '{self.folder}': put one per sample in "
                             f"'{folder}' named by the sample's index in shard order (000000.png, 000001.png ...)")
        return found

    def _read_shard(self, shard: int) -> dict:
        if shard in self._cache:
            return self._cache[shard]
        path = self.shards[shard]
        try:
            with open(path, "rb") as f:
                data = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:  # a pickle torch refuses to read safely, or not a shard at all
            raise ValueError(f"cannot read '{path}' as a SaveTrainingDataset shard with torch.load(weights_only=True):"
                             f" {err}") from None
        if not isinstance(data, Mapping) or "latents" not in data or "conditioning" not in data:
            raise ValueError(f"'{path}' is not a SaveTrainingDataset shard (expected keys latents, conditioning)")
        if len(self._cache) >= self.cache_shards:
            self._cache.pop(next(iter(self._cache)))
        self._cache[shard] = data
        return data

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        import bisect

        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def load(self, ref: SampleRef) -> dict:
        shard, offset = self.locate(ref.index)
        data = self._read_shard(shard)
        latent = data["latents"][offset]
        latent = latent["samples"] if isinstance(latent, Mapping) else latent
        if not isinstance(latent, torch.Tensor) or latent.ndim not in (3, 4):
            raise ValueError(f"sample {ref.index} of '{self.shards[shard]}' has no latent tensor")
        latent = latent[0] if latent.ndim == 4 else latent
        files = self.conditions.get(ref.index, {})
        if ref.condition not in files:
            raise ValueError(f"sample {ref.index} (shard {self.shards[shard].name}, item {offset}) has no "
                             f"'{ref.condition}' condition image in '{self.folder / 'conditions'}' (expected "
                             f"{ref.index:06d}{'' if ref.condition == CONDITION else '_' + ref.condition}.png)")
        size = (latent.shape[-2] * 8, latent.shape[-1] * 8)
        sample = {"key": f"{self.shards[shard].name}[{offset}]", "latent": latent.float().clone(),
                  "condition": load_image(files[ref.condition], size),
                  "conditioning": data["conditioning"][offset]}
        if LOSS_WEIGHT in files:
            sample["loss_weight"] = load_image(files[LOSS_WEIGHT], size, mode="L")
        return sample

    def epoch_order(self, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
        if not shuffle:
            return torch.arange(len(self))
        g = generator(seed, "epoch", epoch)
        parts = []
        for shard in torch.randperm(len(self.shards), generator=g).tolist():
            parts.append(self.starts[shard] + torch.randperm(self.sizes[shard], generator=g))
        return torch.cat(parts)

    def describe(self) -> str:
        return f"SaveTrainingDataset '{self.folder.name}': {len(self)} pre-encoded samples in {len(self.shards)} shards"

    def __getstate__(self):  # workers start with an empty cache
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state


def is_magicid_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is what Build MagicID Dataset writes (its ``dataset.json`` marks it)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MAGICID_INFO))


def open_dataset(path: str | os.PathLike, resolution: int | None) -> SampleSource | TarShards:
    """The source a dataset path names, by its layout: a MagicID dataset folder (``dataset.json`` + manifest, what
    Build MagicID Dataset writes: ``mmf.MagicIDSource``), a SaveTrainingDataset folder (``shard_NNNN.pkl``), tar
    shards (a folder of ``.tar`` files, a ``.tar`` file, a glob or a brace pattern), or a folder of pairs."""
    text = os.fspath(path)
    if is_magicid_folder(text):
        from .mmf import MagicIDSource  # numpy/OpenCV: only when a MagicID folder is trained on

        return MagicIDSource(text, resolution or 512)
    if os.path.isdir(text) and any(CORE_SHARD_RE.match(name) for name in os.listdir(text)):
        return CoreDatasetSamples(text)
    if find_tar_shards(text):
        from .train_streams import TarShards

        return TarShards(text, resolution)
    if os.path.isdir(text):
        found = find_pair_samples(text)
        if not found:
            raise ValueError(f"no (image, condition) pairs in '{text}': use images/ + conditions/ with matching "
                             "file names, or NAME.png + NAME_condition.png; or a SaveTrainingDataset folder "
                             "(shard_NNNN.pkl), or .tar shards")
        return PairFolderSamples(found, resolution or 512)
    raise ValueError(f"dataset '{text}' is neither a folder nor tar shards")


def is_stream(source) -> bool:
    """Streaming sources (TarShards or anything shaped like it) read whole shards: ``iter_shard``."""
    return callable(getattr(source, "iter_shard", None))


def as_source(samples) -> SampleSource | TarShards:
    # by shape, not class: the same module may be loaded twice (ComfyUI loads the pack under its own name)
    if is_stream(samples) or (callable(getattr(samples, "load", None)) and hasattr(samples, "__len__")):
        return samples
    if isinstance(samples, Sequence) and not isinstance(samples, (str, bytes)):
        return InMemorySamples(samples)
    raise ValueError("samples must be a SampleSource, a TarShards stream or a list of sample dicts")


class MapPlan:
    """This rank's micro-batches of a map-style source from ``start_step`` to ``steps`` (an iterable of lists of
    SampleRef), positions counted from ``start_position`` (the samples a resumed run had consumed)."""

    def __init__(self, source: SampleSource, layout: BatchLayout, *, seed: int, start_step: int, steps: int,
                 start_position: int, shuffle: bool = True, condition_choice: ConditionChoice | None = None):
        self.n = len(source)
        if self.n == 0:
            raise ValueError("no training samples")
        self.source, self.layout, self.seed = source, layout, int(seed)
        self.start_step, self.steps, self.start_position = int(start_step), int(steps), int(start_position)
        self.shuffle = shuffle
        self.choice = condition_choice or single_condition
        self._orders: dict[int, torch.Tensor] = {}

    def index_at(self, position: int) -> int:
        epoch, within = divmod(position, self.n)
        if epoch not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k >= epoch - 1}
            self._orders[epoch] = self.source.epoch_order(self.seed, epoch, self.shuffle)
        return int(self._orders[epoch][within])

    def refs(self, step: int, micro: int) -> list[SampleRef]:
        base = self.start_position + (step - self.start_step) * self.layout.global_batch
        key = self.choice(self.seed, step)
        return [SampleRef(self.index_at(base + slot), base + slot, step, slot, key, self.seed)
                for slot in self.layout.slots(micro)]

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.layout.accumulation

    def __iter__(self) -> Iterator[list[SampleRef]]:
        for step in range(self.start_step, self.steps):
            for micro in range(self.layout.accumulation):
                yield self.refs(step, micro)


class _MapDataset(torch.utils.data.Dataset):
    def __init__(self, source: SampleSource):
        self.source = source

    def __getitem__(self, ref: SampleRef) -> dict:
        sample = self.source.load(ref)
        sample["_ref"] = ref
        return sample

    def __len__(self) -> int:
        return len(self.source)


# ----------------------------------------------------------------------------------------------------- collate


def collate(samples: Sequence[Mapping]) -> dict:
    """Stack the tensors of equal-shaped samples; anything else (conditioning, keys, refs) becomes a list."""
    if not samples:
        raise ValueError("empty batch")
    keys = set(samples[0])
    for s in samples[1:]:
        if set(s) != keys:
            raise ValueError(f"samples of one batch carry different fields: {sorted(keys)} vs {sorted(set(s))} "
                             f"({samples[0].get('key')} and {s.get('key')})")
    out = {}
    for k in sorted(keys):
        values = [s[k] for s in samples]
        if not k.startswith("_") and k != "conditioning" and all(isinstance(v, torch.Tensor) for v in values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                names = ", ".join(f"{s.get('key')} {tuple(s[k].shape)}" for s in samples)
                raise ValueError(f"the samples of one batch have different '{k}' sizes ({names}): use batch size 1 "
                                 "or give every sample the same size")
            out[k] = torch.stack(values)
        else:
            out[k] = values
    return out


# ------------------------------------------------------------------------ tar shard paths (train_streams reads them)


def expand_braces(pattern: str) -> list[str]:
    """``shard-{0000..0099}.tar`` -> the 100 names (webdataset's brace notation; zero padding kept)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    names = []
    for i in range(int(lo), int(hi) + 1):
        names.extend(expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():]))
    return names


def find_tar_shards(spec: str | os.PathLike | Sequence) -> list[str]:
    """Tar shard paths from a folder (its ``*.tar`` files), a glob, a brace pattern, or a list of those."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in find_tar_shards(s)]
    text = os.fspath(spec)
    if os.path.isdir(text):
        return sorted(str(p) for p in Path(text).iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz")))
    if "{" in text:
        return [p for name in expand_braces(text) for p in find_tar_shards(name)]
    if any(c in text for c in "*?["):
        return sorted(glob.glob(text))
    return [text] if os.path.isfile(text) else []


# ------------------------------------------------------------------------------------------------------ loaders


def make_loader(source, layout: BatchLayout, *, seed: int, start_step: int, steps: int, resume: Mapping | None = None,
                shuffle: bool = True, condition_choice: ConditionChoice | None = None, num_workers: int = 0,
                pin_memory: bool = False):
    """(an iterator over this rank's collated micro-batches, the plan). ``resume``: ``{"position": int}`` for a
    map-style source, ``{"stream": {"epoch", "items"}}`` for tar shards."""
    source = as_source(source)
    resume = resume or {}
    if num_workers > 0 and not _can_fork():
        import logging

        logging.getLogger("magic_portrait.train").warning(
            "this platform cannot fork: the data is loaded in the training process (num_workers 0)")
        num_workers = 0
    if is_stream(source):
        from .train_streams import StreamDataset, StreamPlan

        plan = StreamPlan(source, layout, seed=seed, start_step=start_step, steps=steps,
                          position=resume.get("stream"), shuffle=shuffle, condition_choice=condition_choice)
        dataset = StreamDataset(plan)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                             pin_memory=pin_memory, **_worker_options(num_workers))
    else:
        plan = MapPlan(source, layout, seed=seed, start_step=start_step, steps=steps,
                       start_position=int(resume.get("position", start_step * layout.global_batch)),
                       shuffle=shuffle, condition_choice=condition_choice)
        loader = torch.utils.data.DataLoader(_MapDataset(source), batch_sampler=plan, collate_fn=collate,
                                             num_workers=num_workers, pin_memory=pin_memory,
                                             **_worker_options(num_workers))
    return iter(loader), plan


def _can_fork() -> bool:
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()


def _worker_options(num_workers: int) -> dict:
    if num_workers <= 0:
        return {}
    # fork: workers inherit the sources as they are (ComfyUI loads packs under module names a spawned process
    # cannot import, so spawn is no option)
    return {"multiprocessing_context": "fork", "prefetch_factor": 4, "persistent_workers": False}


def resize_weight(weight: torch.Tensor, latent_hw: Sequence[int]) -> torch.Tensor:
    """A per-pixel loss weight (B, 1, H, W) brought to the latent's size by area averaging (or nearest if larger)."""
    if tuple(weight.shape[-2:]) == tuple(latent_hw):
        return weight
    if weight.shape[-2] >= latent_hw[0] and weight.shape[-1] >= latent_hw[1]:
        return F.adaptive_avg_pool2d(weight, tuple(latent_hw))
    return F.interpolate(weight, size=tuple(latent_hw), mode="nearest")
