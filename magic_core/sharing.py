"""One base for objects that ComfyUI must pass along, never copy.

ComfyUI deep-copies ``model_options`` (and so ``transformer_options``, patches and conditioning extras) whenever it
clones a model or starts a run. Patch objects, stores and run records hold captured tensors, counters and links
between nodes that must stay one object across those copies, so copying them returns the object itself.
"""

from __future__ import annotations


class SharedOnCopy:
    """``copy.copy`` and ``copy.deepcopy`` return the object itself: it is shared, not duplicated, by ComfyUI's
    per-run copies of model options."""

    __slots__ = ()

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self
