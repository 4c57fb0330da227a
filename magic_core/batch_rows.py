"""The rows of one batched attention call and the source rows each of them reads: the pack's one batch mapping.

ComfyUI runs CFG's branches as chunks of one batch: ``cond_or_uncond`` lists the chunks' kinds (0 positive,
1 negative) and every chunk holds the same B images, so row r of the call is image ``r % B`` of chunk ``r // B``.
A source (a KV store's features, a content or style batch) has 1 row, shared by every image, or B rows, image i
for row i of every chunk. Which chunk a recording keeps and how the rows split into separately fused parts are
answered here too, so capture, fusion and the store read the batch the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

COND, UNCOND = 0, 1


@dataclass(frozen=True)
class RowPart:
    """Whole chunks of a call, fused together: their rows and their kinds (``cond_or_uncond`` of the part)."""

    rows: slice
    kinds: tuple[int, ...]

    @property
    def branch(self) -> str:
        """"uncond" for a part of only the unconditional chunk, else "cond" (how fusion treats it)."""
        return "uncond" if self.kinds == (UNCOND,) else "cond"


@dataclass(frozen=True)
class BatchRows:
    """A call of ``len(kinds)`` chunks of ``per_chunk`` rows each; ``kinds`` is ComfyUI's ``cond_or_uncond``."""

    kinds: tuple[int, ...]
    per_chunk: int

    @classmethod
    def of(cls, rows: int, cond_or_uncond: Sequence[int] | None = None) -> BatchRows:
        """The layout of a call of `rows` rows (no ``cond_or_uncond``: one positive chunk)."""
        kinds = tuple(int(c) for c in cond_or_uncond) if cond_or_uncond else (COND,)
        if rows % len(kinds):
            raise ValueError(f"{rows} rows do not split into {len(kinds)} cond/uncond chunks")
        return cls(kinds, rows // len(kinds))

    @classmethod
    def per_image(cls, images: int, cond_or_uncond: Sequence[int] | None = None) -> BatchRows:
        """The layout of a call of `images` images per chunk."""
        kinds = tuple(int(c) for c in cond_or_uncond) if cond_or_uncond else (COND,)
        return cls(kinds, int(images))

    @property
    def rows(self) -> int:
        return self.per_chunk * len(self.kinds)

    def chunk(self, index: int) -> slice:
        return slice(index * self.per_chunk, (index + 1) * self.per_chunk)

    def kept_chunk(self) -> slice:
        """The rows a recording keeps: the first positive chunk, else the first chunk."""
        return self.chunk(self.kinds.index(COND) if COND in self.kinds else 0)

    def parts(self, uncond_apart: bool) -> list[RowPart]:
        """The call's rows in the parts fused separately: all rows at once, or, when the unconditional branch is
        treated apart and the call holds it, one part per chunk."""
        if not uncond_apart or UNCOND not in self.kinds:
            return [RowPart(slice(0, self.rows), self.kinds)]
        return [RowPart(self.chunk(j), (kind,)) for j, kind in enumerate(self.kinds)]

    def accepts(self, source_rows: int) -> bool:
        """Whether a source of `source_rows` rows maps onto this call (1: shared, per_chunk: one per image)."""
        return source_rows in (1, self.per_chunk)

    def source_rows(self, source: torch.Tensor | None, part: slice | None = None, *,
                    broadcast: bool = True) -> torch.Tensor | None:
        """The rows of `source` that the call's rows `part` (whole chunks; default all rows) read.

        A shared source (1 row) stays one row when `broadcast` (attention broadcasts it and its projections run once)
        or is expanded (a view) to the part's rows; a source of ``per_chunk`` rows is repeated once per chunk in the
        part. None stays None.
        """
        if source is None:
            return None
        start, stop, step = (part or slice(0, self.rows)).indices(self.rows)
        count = stop - start
        if step != 1 or start % self.per_chunk or count <= 0 or count % self.per_chunk:
            raise ValueError(f"rows {start}:{stop} are not whole chunks of {self.per_chunk} rows")
        n = int(source.shape[0])
        if not self.accepts(n):
            raise ValueError(f"a source of {n} rows does not map onto {len(self.kinds)} chunk(s) of "
                             f"{self.per_chunk} images: it needs 1 row (shared by every image) or {self.per_chunk} "
                             "(one per image)")
        if n == 1:
            return source if broadcast or count == 1 else source.expand(count, *source.shape[1:])
        chunks = count // self.per_chunk
        return source if chunks == 1 else source.repeat(chunks, *([1] * (source.ndim - 1)))
