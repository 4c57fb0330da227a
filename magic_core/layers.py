"""Self-attention layer tables, layer presets and a parser for custom layer lists.

A self-attention layer is addressed as ``(block_name, number, transformer_index)``, exactly the arguments ComfyUI's
``set_model_attn1_replace(fn, block_name, number, transformer_index)`` takes and the values an attention patch finds in
``extra_options["block"]`` / ``extra_options["block_index"]``. ``block_name`` is ``"input"``, ``"middle"`` or
``"output"``; the middle block is ``("middle", 0)``.

Tables (channels, down factor of the token grid relative to the latent, transformer depth):

- ``sd15``: input 1,2 (320, 1) / 4,5 (640, 2) / 7,8 (1280, 4); middle 0 (1280, 8); output 3-5 (1280, 4) /
  6-8 (640, 2) / 9-11 (320, 1); depth 1 everywhere; 8 heads.
- ``sdxl``: input 4,5 (640, 2, depth 2) / 7,8 (1280, 4, depth 10); middle 0 (1280, 4, depth 10); output 0-2
  (1280, 4, depth 10) / 3-5 (640, 2, depth 2); heads of 64 dims.

Models with another structure (tiny test models, pruned UNets) pass ``depths``: the model's own table
``{(block, number): depth}``, which then *replaces* the family's table (entries with depth 0 are ignored). Presets are
defined by rules on block numbers, so they apply to such a table and select only layers that exist; a preset or list
that selects nothing is an error (ComfyUI would otherwise silently never call the patch).

Layer presets (``PRESETS``):

- ``all``: every self-attention layer.
- ``encoder`` / ``middle`` / ``decoder``: the input / middle / output blocks.
- ``instantstyle_style``: InstantStyle's style block: SDXL output 1 (``up_blocks.0.attentions.1``);
  SD1.5 output 3, 4, 5.
- ``instantstyle_layout``: InstantStyle's layout block: SDXL input 8 (``down_blocks.2.attentions.1``);
  SD1.5 input 7, 8 and middle 0.
- ``styleid``: StyleID's layers: SD1.5 output 6-11, the decoder levels at 1/2 and 1/1 of the latent resolution.
  SDXL has no attention at full latent resolution; the same rule (decoder layers at latent/2 or finer) gives
  output 3-5 (4096 tokens at 1024 px, the token count SD1.5's output 9-11 has at 512 px). Use ``decoder`` for more.
- ``masactrl``: MasaCtrl's layers: SD1.5 from self-attention layer 10 of 16 in execution order, i.e. output 6-11.
  SDXL: layer 44 of 70, the first setting of MasaCtrl's SDXL script, i.e. output 1:0 onwards (output 1, 2, 3-5).

Custom lists (``parse_layer_spec``): comma/semicolon/newline separated items; each item is a preset name, or a block
name with optional numbers and ranges and optional ``:transformer indices`` (numbers/ranges), e.g.
``"output 3-5, middle 0, input 8:0-3"``. A block name alone means all of that block's layers; an item of numbers
without a block continues the previous item's block (``"input 7, 8"``). Aliases: ``in``/``mid``/``out``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from . import families

LayerKey = tuple[str, int, int]
BLOCKS = ("input", "middle", "output")
FAMILIES = families.LAYER_TABLE_FAMILIES

_BLOCK_ALIASES = {
    "input": "input",
    "in": "input",
    "middle": "middle",
    "mid": "middle",
    "output": "output",
    "out": "output",
}


@dataclass(frozen=True)
class LayerInfo:
    block: str
    number: int
    depth: int  # transformer blocks in this SpatialTransformer (indices 0..depth-1)
    channels: int  # width of the hidden state entering attn1 (= heads * dim_head for SD1.5/SDXL)
    heads: int
    dim_head: int
    down: int  # token grid = latent grid downsampled by this factor


def _table(rows):
    out = {}
    for block, numbers, channels, down, depth, heads in rows:
        for number in numbers:
            out[(block, number)] = LayerInfo(block, number, depth, channels, heads, channels // heads, down)
    return out


_TABLES: dict[str, dict[tuple[str, int], LayerInfo]] = {
    "sd15": _table(
        [
            ("input", (1, 2), 320, 1, 1, 8),
            ("input", (4, 5), 640, 2, 1, 8),
            ("input", (7, 8), 1280, 4, 1, 8),
            ("middle", (0,), 1280, 8, 1, 8),
            ("output", (3, 4, 5), 1280, 4, 1, 8),
            ("output", (6, 7, 8), 640, 2, 1, 8),
            ("output", (9, 10, 11), 320, 1, 1, 8),
        ]
    ),
    "sdxl": _table(
        [
            ("input", (4, 5), 640, 2, 2, 10),
            ("input", (7, 8), 1280, 4, 10, 20),
            ("middle", (0,), 1280, 4, 10, 20),
            ("output", (0, 1, 2), 1280, 4, 10, 20),
            ("output", (3, 4, 5), 640, 2, 2, 10),
        ]
    ),
}


class LayerSpecError(ValueError):
    """A layer preset or custom layer list that is malformed or names layers the model does not have."""


def normalize_family(family: str) -> str:
    """The family's layer-table name; SD2.x and Kolors have no table here and are refused."""
    canonical = families.normalize(family)
    if canonical in FAMILIES:
        return canonical
    raise LayerSpecError(f"unknown model family {family!r}; supported: {', '.join(FAMILIES)}")


def _order(key) -> tuple[int, int, int]:
    return (BLOCKS.index(key[0]), key[1], key[2] if len(key) > 2 else 0)


def block_depths(family: str, depths: Mapping[tuple[str, int], int] | None = None) -> dict[tuple[str, int], int]:
    """{(block, number): transformer depth} of the model, in execution order (the family's table or `depths`)."""
    if depths is None:
        table = {key: info.depth for key, info in _TABLES[normalize_family(family)].items()}
    else:
        table = {}
        for key, depth in depths.items():
            if not (isinstance(key, tuple) and len(key) == 2 and key[0] in BLOCKS):
                raise LayerSpecError(f"depths key {key!r} must be (block, number) with block in {BLOCKS}")
            if int(depth) < 0:
                raise LayerSpecError(f"depth of {key[0]} {key[1]} must be >= 0, got {depth}")
            if int(depth) > 0:
                table[(key[0], int(key[1]))] = int(depth)
    return dict(sorted(table.items(), key=lambda item: _order(item[0])))


def depths_of(layers: Iterable[LayerKey]) -> dict[tuple[str, int], int]:
    """{(block, number): transformer depth} of a model, from its (block, number, index) layer keys."""
    depths: dict[tuple[str, int], int] = {}
    for b, n, _ in layers:
        depths[(b, n)] = depths.get((b, n), 0) + 1
    return depths


def layer_info(family: str, block: str, number: int) -> LayerInfo:
    """Channels, heads, depth and down factor of one attention block in the family's standard table."""
    table = _TABLES[normalize_family(family)]
    if (block, number) not in table:
        raise LayerSpecError(f"{block} {number} has no self-attention in {normalize_family(family)}")
    return table[(block, number)]


def all_layers(family: str, depths: Mapping[tuple[str, int], int] | None = None) -> list[LayerKey]:
    """Every self-attention layer of the model, in execution order."""
    return [(block, number, i) for (block, number), depth in block_depths(family, depths).items() for i in range(depth)]


def sort_layers(layers: Iterable[LayerKey]) -> list[LayerKey]:
    return sorted({(str(b), int(n), int(i)) for b, n, i in layers}, key=_order)


# Preset rules: per family, a predicate on (block, number, index). Defined as rules so they also apply to `depths`.
def _rule_masactrl_sdxl(b, n, i):
    return b == "output" and n >= 1


PRESETS: dict[str, dict[str, object]] = {
    "all": {"sd15": lambda b, n, i: True, "sdxl": lambda b, n, i: True},
    "encoder": {"sd15": lambda b, n, i: b == "input", "sdxl": lambda b, n, i: b == "input"},
    "middle": {"sd15": lambda b, n, i: b == "middle", "sdxl": lambda b, n, i: b == "middle"},
    "decoder": {"sd15": lambda b, n, i: b == "output", "sdxl": lambda b, n, i: b == "output"},
    "instantstyle_style": {
        "sd15": lambda b, n, i: b == "output" and n in (3, 4, 5),
        "sdxl": lambda b, n, i: b == "output" and n == 1,
    },
    "instantstyle_layout": {
        "sd15": lambda b, n, i: (b == "input" and n in (7, 8)) or b == "middle",
        "sdxl": lambda b, n, i: b == "input" and n == 8,
    },
    "styleid": {
        "sd15": lambda b, n, i: b == "output" and 6 <= n <= 11,
        "sdxl": lambda b, n, i: b == "output" and 3 <= n <= 5,
    },
    "masactrl": {
        "sd15": lambda b, n, i: b == "output" and n >= 6,
        "sdxl": _rule_masactrl_sdxl,
    },
}
PRESET_NAMES = tuple(PRESETS)


def preset_layers(name: str, family: str, depths: Mapping[tuple[str, int], int] | None = None) -> list[LayerKey]:
    """The layers a named preset selects in this model; an error if it selects none."""
    key = str(name).strip().lower()
    if key not in PRESETS:
        raise LayerSpecError(f"unknown layer preset {name!r}; presets: {', '.join(PRESET_NAMES)}")
    fam = normalize_family(family)
    rule = PRESETS[key][fam]
    chosen = [layer for layer in all_layers(fam, depths) if rule(*layer)]
    if not chosen:
        raise LayerSpecError(
            f"layer preset {key!r} selects no self-attention layer of this {fam} model "
            f"(it has: {format_layers(all_layers(fam, depths)) or 'none'}); choose another preset or a custom list"
        )
    return chosen


def _ranges(values: list[int]) -> str:
    values = sorted(set(values))
    parts, start = [], None
    for idx, v in enumerate(values):
        if start is None:
            start = v
        if idx + 1 == len(values) or values[idx + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return " ".join(parts)


def format_layer(key: LayerKey) -> str:
    """One layer, always with its transformer index (``"output 3:0"``), as messages about a single layer name it."""
    return f"{key[0]} {key[1]}:{key[2]}"


def format_layers(layers: Iterable[LayerKey], depths: Mapping[tuple[str, int], int] | None = None) -> str:
    """Compact text for a layer list that `parse_layer_spec` reads back, e.g. ``"output 6-11; middle 0:0-4"``.

    With `depths` (the model's table) a block whose every index is selected is written without ``:indices``;
    without it, ``:indices`` are omitted only when the block's selection is the single index 0.
    """
    by_block: dict[tuple[str, int], list[int]] = {}
    for b, n, i in sort_layers(layers):
        by_block.setdefault((b, n), []).append(i)
    # group consecutive numbers of one block sharing the same index selection
    groups: list[tuple[str, list[int], tuple[int, ...]]] = []
    for (b, n), idx in by_block.items():
        full = depths is not None and depths.get((b, n)) == len(idx) and idx == list(range(len(idx)))
        sel = () if full or (depths is None and idx == [0]) else tuple(idx)
        if groups and groups[-1][0] == b and groups[-1][2] == sel:
            groups[-1][1].append(n)
        else:
            groups.append((b, [n], sel))
    items = []
    for b, numbers, sel in groups:
        text = f"{b} {_ranges(numbers)}"
        if sel:
            text += ":" + _ranges(list(sel))
        items.append(text)
    return "; ".join(items)


_NUM = re.compile(r"^(\d+)(?:-(\d+))?$")


def _parse_range(text: str, what: str, item: str) -> list[int]:
    m = _NUM.match(text)
    if not m:
        raise LayerSpecError(f"bad {what} {text!r} in {item!r}: expected a number or a range like 3-5")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if hi < lo:
        raise LayerSpecError(f"bad {what} range {text!r} in {item!r}: the end is below the start")
    return list(range(lo, hi + 1))


def parse_layer_spec(
    spec: str, family: str, depths: Mapping[tuple[str, int], int] | None = None
) -> list[LayerKey]:
    """Parse a custom layer list (see the module docstring) into layer keys, in execution order."""
    fam = normalize_family(family)
    table = block_depths(fam, depths)
    if not isinstance(spec, str):
        raise LayerSpecError(f"a layer list must be text, got {type(spec).__name__}")
    chosen: set[LayerKey] = set()
    previous_block: str | None = None
    items = [part.strip() for part in re.split(r"[,;\n]", spec)]
    if not any(items):
        raise LayerSpecError("the layer list is empty; give a preset name or e.g. 'output 3-5, middle 0'")
    for raw in items:
        if not raw:
            continue
        item = raw.lower()
        if item in PRESETS:
            chosen.update(preset_layers(item, fam, depths))
            previous_block = None
            continue
        if item.count(":") > 1:
            raise LayerSpecError(f"bad layer item {raw!r}: at most one ':' (block numbers:transformer indices)")
        head, sep, idx_text = item.partition(":")
        head = re.sub(r"\s*-\s*", "-", head.strip())
        m = re.match(r"^([a-z_]+)?\s*(.*)$", head)
        word, rest = m.group(1), m.group(2).strip()
        if word is not None:
            if word not in _BLOCK_ALIASES:
                raise LayerSpecError(
                    f"unknown block {word!r} in {raw!r}: expected input, middle or output "
                    f"(or a preset: {', '.join(PRESET_NAMES)})"
                )
            block = _BLOCK_ALIASES[word]
        elif previous_block is not None:
            block = previous_block
        else:
            raise LayerSpecError(f"layer item {raw!r} has no block name; write e.g. 'output 3-5'")
        previous_block = block
        available = sorted(n for (b, n) in table if b == block)
        if rest:
            numbers: list[int] = []
            for token in rest.split():
                numbers.extend(_parse_range(token, "block number", raw))
        else:
            if not available:
                raise LayerSpecError(f"{raw!r}: this {fam} model has no self-attention in the {block} block")
            numbers = available
        idx_text = re.sub(r"\s*-\s*", "-", idx_text.strip())
        if sep and not idx_text:
            raise LayerSpecError(f"bad layer item {raw!r}: nothing after ':' (expected a transformer index or range)")
        indices = None
        if idx_text:
            indices = []
            for token in idx_text.split():
                indices.extend(_parse_range(token, "transformer index", raw))
        for number in numbers:
            if (block, number) not in table:
                where = _ranges(available) if available else "none"
                raise LayerSpecError(
                    f"{block} {number} (in {raw!r}) has no self-attention in this {fam} model "
                    f"({block} blocks with self-attention: {where})"
                )
            depth = table[(block, number)]
            use = indices if indices is not None else list(range(depth))
            bad = [i for i in use if i >= depth]
            if bad:
                raise LayerSpecError(
                    f"{raw!r}: {fam} {block} {number} has {depth} transformer block(s) "
                    f"(indices 0-{depth - 1}), not index {bad[0]}"
                )
            chosen.update((block, number, i) for i in use)
    if not chosen:
        raise LayerSpecError(f"the layer list {spec!r} selects no layer")
    return sort_layers(chosen)


def resolve_layers(
    spec: str | Iterable[LayerKey], family: str, depths: Mapping[tuple[str, int], int] | None = None
) -> list[LayerKey]:
    """A preset name, a custom list string, or an iterable of layer keys -> validated keys in execution order."""
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in PRESETS:
            return preset_layers(key, family, depths)
        return parse_layer_spec(spec, family, depths)
    table = block_depths(family, depths)
    out = []
    for layer in spec:
        if not (isinstance(layer, (tuple, list)) and len(layer) == 3):
            raise LayerSpecError(f"layer {layer!r} must be (block, number, transformer_index)")
        b, n, i = str(layer[0]), int(layer[1]), int(layer[2])
        if (b, n) not in table or not 0 <= i < table[(b, n)]:
            raise LayerSpecError(f"layer {b} {n}:{i} does not exist in this {normalize_family(family)} model")
        out.append((b, n, i))
    if not out:
        raise LayerSpecError("the layer list is empty")
    return sort_layers(out)


def tokens_at(family: str, block: str, number: int, latent_h: int, latent_w: int) -> tuple[int, int]:
    """(h, w) of the token grid at that layer for a latent of latent_h x latent_w (tokens = h * w).

    Each downsample is a stride-2 conv with padding 1, so odd sizes round up (ceil), as in ComfyUI's UNet; the
    decoder's upsampling matches the encoder's skip sizes, so output blocks share their level's grid.
    """
    down = layer_info(family, block, number).down
    h, w = int(latent_h), int(latent_w)
    for _ in range(int(round(math.log2(down)))):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def parse_layer_weights(
    text: str, family: str, depths: Mapping[tuple[str, int], int] | None = None
) -> dict[LayerKey, float]:
    """Per-layer weights from ``LAYERS = WEIGHT`` entries separated by ``;`` or new lines, e.g.
    ``"all = 0; instantstyle_style = 1"`` (InstantStyle-style block targeting) or ``"input = 0.5\\noutput 3-5 = 1"``.
    ``LAYERS`` is a preset or a custom list (commas allowed); entries apply in order, a later one overriding an
    earlier one; layers no entry names get 0; a bare number ``W`` means ``all = W``. Returns every layer of the
    model with its weight."""
    if not isinstance(text, str) or not text.strip():
        raise LayerSpecError("the layer weights are empty; write e.g. 'all = 1' or 'all = 0; instantstyle_style = 1'")
    weights = dict.fromkeys(all_layers(family, depths), 0.0)
    for raw in re.split(r"[;\n]", text):
        entry = raw.strip()
        if not entry:
            continue
        spec, sep, value = entry.rpartition("=")
        if not sep:
            spec, value = "all", entry
        try:
            weight = float(value)
        except ValueError:
            raise LayerSpecError(f"layer weight entry {entry!r}: write LAYERS = NUMBER, e.g. 'output 3-5 = 0.8'") \
                from None
        if not math.isfinite(weight):
            raise LayerSpecError(f"layer weight entry {entry!r}: the weight must be a finite number")
        for key in resolve_layers(spec.strip(), family, depths):
            weights[key] = weight
    return weights
