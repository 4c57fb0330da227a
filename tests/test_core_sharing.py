"""Every patch, store and run record ComfyUI passes through model_options stays one object across its copies."""

import copy
import importlib
import pkgutil

import magic_core
from magic_core.sharing import SharedOnCopy


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_core_classes_that_must_stay_shared_are_shared_on_copy():
    for info in pkgutil.iter_modules(magic_core.__path__):
        importlib.import_module(f"magic_core.{info.name}")
    names = {c.__name__ for c in _subclasses(SharedOnCopy)}
    # The stores and run records that ComfyUI's per-run deep copies of model_options carry.
    assert {"KVStore", "CaptureGate", "BoundaryLog", "IPAdapterFile"} <= names


def test_copies_return_the_object_and_a_dict_of_them_keeps_identity():
    class Patch(SharedOnCopy):
        def __init__(self):
            self.calls = 0

    patch = Patch()
    options = {"transformer_options": {"patches_replace": {"attn1": {("input", 1): patch}}}}
    copied = copy.deepcopy(options)
    assert copied["transformer_options"]["patches_replace"]["attn1"][("input", 1)] is patch
    assert copy.copy(patch) is patch
    assert copied is not options
