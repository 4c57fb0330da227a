"""The model families the pack speaks of, in one place: their names, the spellings users and files give them, the
labels messages show, and what tells them apart (cross-attention width, layer count).

Layer tables (``layers``), KV stores and RepControlNet files know ``sd15`` and ``sdxl`` only: SD2.x shares SD1.5's
block positions, so the nodes read an SD2.x UNet with the SD1.5 table (``layer_table_family``). IP-Adapter files also
name ``sd2x`` and ``kolors``.
"""

from __future__ import annotations

SD15 = "sd15"
SD2X = "sd2x"
SDXL = "sdxl"
KOLORS = "kolors"
UNKNOWN = "unknown"

FAMILIES = (SD15, SD2X, SDXL, KOLORS)
LAYER_TABLE_FAMILIES = (SD15, SDXL)
# What a file or a caller writes when it does not say which family: the family check is skipped for these.
UNKNOWN_SPELLINGS = ("", UNKNOWN, "any")

LABELS = {SD15: "SD1.5", SD2X: "SD2.x", SDXL: "SDXL", KOLORS: "Kolors", UNKNOWN: "an unknown family"}
FAMILY_BY_CROSS_DIM = {768: SD15, 1024: SD2X, 2048: SDXL}
CROSS_ATTENTION_LAYERS = {SD15: 16, SD2X: 16, SDXL: 70, KOLORS: 70}
LABEL_BY_LAYER_COUNT = {16: LABELS[SD15], 70: LABELS[SDXL]}

# Spellings after lower-casing and dropping spaces and hyphens (``spelling_key``).
_ALIASES = {
    "sd15": SD15, "sd1.5": SD15, "sd1": SD15, "sd1x": SD15, "sd_15": SD15, "sd15_v": SD15,
    "sd2": SD2X, "sd2x": SD2X, "sd2.x": SD2X, "sd20": SD2X, "sd21": SD2X, "sd2.1": SD2X, "sd2.0": SD2X,
    "sdxl": SDXL, "sd_xl": SDXL, "xl": SDXL,
    "kolors": KOLORS,
}


def spelling_key(family) -> str:
    """How a family name is compared: lower case, without spaces or hyphens (``SD 1.5`` and ``sd1.5`` are one)."""
    return str(family).strip().lower().replace(" ", "").replace("-", "")


def normalize(family) -> str | None:
    """The canonical name (``sd15``, ``sd2x``, ``sdxl``, ``kolors``) of a spelling, or None when it names none.
    Callers raise their own error for None, since each says what it supports."""
    return _ALIASES.get(spelling_key(family))


def is_unknown(family) -> bool:
    """The family is not stated (``""``, ``unknown``, ``any``, or None)."""
    return family is None or str(family).strip().lower() in UNKNOWN_SPELLINGS


def layer_table_family(family: str) -> str | None:
    """The layer table a canonical family uses: SD2.x reads as SD1.5 (same block positions); None for families
    without a table."""
    if family == SD2X:
        return SD15
    return family if family in LAYER_TABLE_FAMILIES else None


def label(family: str) -> str:
    """``SD1.5``, ``SDXL``...; an unlisted name is shown as it is."""
    return LABELS.get(family, family)
