"""Streaming training data: webdataset-layout ``.tar`` shards, too many samples to list, read shard by shard. How
the shards are dealt to the ranks each epoch and how a resume continues them are in ``train_data``'s module doc ("The
order"); this module decodes the samples, deals the shards, and carries a rank's position across checkpoints.
Pure torch/PIL.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from .train_data import (
    CONDITION,
    IMAGE_EXTENSIONS,
    LOSS_WEIGHT,
    BatchLayout,
    ConditionChoice,
    SampleRef,
    collate,
    find_tar_shards,
    generator,
    load_image,
    single_condition,
)


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's grouping: ``dir/0001.condition.png`` -> (``dir/0001``, ``condition.png``)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_LATENT_EXTS = ("latent.safetensors", "latent.npy", "latent.pth", "latent.pt")


def decode_tar_sample(key: str, read: Callable[[str], bytes], exts: Sequence[str], ref: SampleRef,
                      resolution: int | None = None) -> dict:
    """A sample from the files of one tar sample: the image (``jpg``/``png``/``webp``/``image.<ext>``) or a
    pre-encoded latent (``latent.safetensors`` / ``latent.npy`` / ``latent.pth``, tensors only), the condition
    ``<key>.<image ext>`` of the chosen key (``condition`` also as ``cond``/``control``) and ``loss_weight.<ext>``."""
    by_ext = set(exts)
    sample: dict = {"key": key}
    latent_ext = next((e for e in _LATENT_EXTS if e in by_ext), None)
    if latent_ext is not None:
        sample["latent"] = _decode_latent(read(latent_ext), latent_ext, key)
    else:
        image_ext = next((e for e in exts if e in _IMAGE_EXTS or (e.startswith("image.") and
                                                                  e.split(".", 1)[1] in _IMAGE_EXTS)), None)
        if image_ext is None:
            raise ValueError(f"tar sample '{key}' has neither an image nor a latent (files: {sorted(by_ext)})")
        sample["image"] = load_image(read(image_ext), resolution)
    names = (ref.condition,) if ref.condition != CONDITION else (CONDITION, "cond", "control")
    cond_ext = next((f"{n}.{e}" for n in names for e in _IMAGE_EXTS if f"{n}.{e}" in by_ext), None)
    if cond_ext is None:
        raise ValueError(f"tar sample '{key}' has no '{ref.condition}' condition image (files: {sorted(by_ext)})")
    size = (tuple(sample["latent"].shape[-2:]) if "latent" in sample else None)
    size = (size[0] * 8, size[1] * 8) if size else tuple(sample["image"].shape[-2:])
    sample["condition"] = load_image(read(cond_ext), size)
    weight_ext = next((f"{LOSS_WEIGHT}.{e}" for e in _IMAGE_EXTS if f"{LOSS_WEIGHT}.{e}" in by_ext), None)
    if weight_ext is not None:
        sample["loss_weight"] = load_image(read(weight_ext), size, mode="L")
    return sample


def _decode_latent(data: bytes, ext: str, key: str) -> torch.Tensor:
    if ext == "latent.safetensors":
        from safetensors.torch import load as load_safetensors

        tensors = load_safetensors(data)
        if len(tensors) != 1:
            raise ValueError(f"tar sample '{key}': latent.safetensors must hold one tensor, got {sorted(tensors)}")
        latent = next(iter(tensors.values()))
    elif ext == "latent.npy":
        import numpy as np

        latent = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    else:
        latent = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        latent = latent.get("samples") if isinstance(latent, Mapping) else latent
    if not isinstance(latent, torch.Tensor) or latent.ndim not in (3, 4):
        raise ValueError(f"tar sample '{key}': the latent must be a (C, h, w) tensor")
    return (latent[0] if latent.ndim == 4 else latent).float().contiguous()


class TarShards:
    """A streaming source of webdataset-layout tar files: the files of a sample share a key (``0001.jpg``,
    ``0001.condition.png``, ``0001.landmark.png``, ``0001.latent.safetensors`` ...) and follow each other. Read with
    plain ``tarfile`` (members are read into memory, never extracted to disk); uncompressed tars are read by
    seeking past the samples another worker decodes."""

    def __init__(self, spec, resolution: int | None = None):
        self.shards = find_tar_shards(spec)
        if not self.shards:
            raise ValueError(f"no .tar shards found for '{spec}' (a folder of .tar files, a glob, or a brace "
                             "pattern like data/shard-{0000..0099}.tar)")
        if resolution is not None and (resolution < 8 or resolution % 8):
            raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
        self.resolution = resolution  # images are centre-cropped and resized to it; None keeps their size

    def __len__(self) -> int:  # shards, not samples
        return len(self.shards)

    def iter_shard(self, shard: int, start: int = 0) -> Iterator[tuple[int, str, list[str], Callable[[str], bytes]]]:
        """(offset, key, extensions, read(ext) -> bytes) for the samples of shard ``shard`` from ``start`` on;
        ``read`` is valid until the next item is taken."""
        path = self.shards[shard]
        mode = "r:" if path.endswith(".tar") else "r:*"
        try:
            tar = tarfile.open(path, mode)
        except (tarfile.TarError, OSError) as err:
            raise ValueError(f"cannot read tar shard '{path}': {err}") from None
        with tar:
            offset, key, members = -1, None, {}
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_member_name(member.name)
                if k != key:
                    if key is not None and offset >= start:
                        yield offset, key, list(members), _reader(tar, members)
                    key, members, offset = k, {}, offset + 1
                members[ext] = member
            if key is not None and offset >= start:
                yield offset, key, list(members), _reader(tar, members)

    def describe(self) -> str:
        return f"{len(self.shards)} tar shards"


def _reader(tar: tarfile.TarFile, members: dict) -> Callable[[str], bytes]:
    def read(ext: str) -> bytes:
        handle = tar.extractfile(members[ext])
        if handle is None:
            raise ValueError(f"tar member '{members[ext].name}' is not a regular file")
        return handle.read()

    return read


def epoch_shards(num_shards: int, seed: int, epoch: int, world_size: int, rank: int, shuffle: bool) -> list[list[int]]:
    """[[shard, start offset], ...] that ``rank`` reads in ``epoch``."""
    order = torch.randperm(num_shards, generator=generator(seed, "shards", epoch)).tolist() if shuffle else list(
        range(num_shards))
    return [[s, 0] for s in order[rank::world_size]]


def redistribute_streams(states: Sequence[Mapping], *, num_shards: int, seed: int, old_world: int, new_world: int,
                         shuffle: bool) -> list[dict]:
    """Stream positions for ``new_world`` ranks from the positions ``old_world`` ranks saved: the unread
    remainder of each old rank's epoch (and whole later-epoch shares of ranks that were an epoch behind the
    furthest one) is dealt out round-robin, so no sample is skipped or read twice; after it every rank goes on with
    the next epoch split over ``new_world``."""
    last = max(int(s["epoch"]) for s in states)
    pending = []
    for rank, state in enumerate(states):
        pending += [(int(state["epoch"]), rank, i, item) for i, item in enumerate(state["items"])]
        for epoch in range(int(state["epoch"]) + 1, last + 1):
            pending += [(epoch, rank, i, item) for i, item in
                        enumerate(epoch_shards(num_shards, seed, epoch, old_world, rank, shuffle))]
    pending.sort(key=lambda p: (p[0], p[2], p[1]))
    items = [list(p[3]) for p in pending]
    return [{"epoch": last, "items": items[r::new_world]} for r in range(new_world)]


class StreamPlan:
    """This rank's endless sample stream over tar shards, from a saved position (``{"epoch", "items"}``)."""

    def __init__(self, source: TarShards, layout: BatchLayout, *, seed: int, start_step: int, steps: int,
                 position: Mapping | None, shuffle: bool = True, condition_choice: ConditionChoice | None = None):
        if len(source) < layout.world_size:
            raise ValueError(f"{len(source)} tar shard(s) for {layout.world_size} ranks: every rank reads whole "
                             "shards, so split the dataset into at least as many shards as there are ranks")
        self.source, self.layout, self.seed = source, layout, int(seed)
        self.start_step, self.steps, self.shuffle = int(start_step), int(steps), shuffle
        self.choice = condition_choice or single_condition
        self.position = dict(position) if position else {
            "epoch": 0, "items": epoch_shards(len(source), self.seed, 0, layout.world_size, layout.rank, shuffle)}

    def items_of(self, epoch: int) -> list[list[int]]:
        if epoch == int(self.position["epoch"]):
            return [list(i) for i in self.position["items"]]
        return epoch_shards(len(self.source), self.seed, epoch, self.layout.world_size, self.layout.rank, self.shuffle)

    def samples(self) -> Iterator[tuple[tuple[int, int, int], str, list[str], Callable]]:
        """((epoch, item, offset), key, exts, read) forever."""
        epoch = int(self.position["epoch"])
        while True:
            items = self.items_of(epoch)
            yielded = False
            for i, (shard, start) in enumerate(items):
                for offset, key, exts, read in self.source.iter_shard(shard, start):
                    yielded = True
                    yield (epoch, i, offset), key, exts, read
            if not yielded and epoch > int(self.position["epoch"]):
                raise ValueError(f"rank {self.layout.rank} found no samples in its shards of epoch {epoch}")
            epoch += 1

    def position_after(self, where: tuple[int, int, int]) -> dict:
        """The saved position that resumes right after the sample at ``where``."""
        epoch, item, offset = where
        items = self.items_of(epoch)[item:]
        items[0] = [items[0][0], offset + 1]
        return {"epoch": epoch, "items": items}

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.layout.accumulation


class StreamDataset(torch.utils.data.IterableDataset):
    """Yields this rank's collated micro-batches; with k workers, worker w decodes micro-batches j = w mod k
    (each worker walks the whole stream but reads only its own samples' bytes), so the order never depends on k."""

    def __init__(self, plan: StreamPlan):
        self.plan = plan

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan, layout = self.plan, self.plan.layout
        total = len(plan)
        j, batch, samples = 0, [], plan.samples()
        while j < total:
            where, key, exts, read = next(samples)
            step = plan.start_step + j // layout.accumulation
            if j % workers == worker:
                slot = layout.slots(j % layout.accumulation)[len(batch)]
                ref = SampleRef(-1, -1, step, slot, plan.choice(plan.seed, step), plan.seed)
                sample = decode_tar_sample(key, read, exts, ref, plan.source.resolution)
                sample["_ref"] = ref
                sample["_where"] = where
                batch.append(sample)
            else:
                batch.append(None)
            if len(batch) == layout.batch_size:
                if j % workers == worker:
                    yield collate(batch)
                j, batch = j + 1, []
