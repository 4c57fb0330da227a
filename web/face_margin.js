// ID Embeds' face_margin counts room on each side of the face since Magic Portrait 0.3.0; in 0.2 it counted both
// sides together. A node saved without the convention property is from 0.2: half its value is the same crop.
// magic_portrait/migrations.py applies the same rule when the headless runner reads a saved workflow.

export const NODE_TYPE = "MagicPortrait_IDEmbeds";
export const WIDGET = "face_margin";
export const CONVENTION_PROPERTY = "face_margin_convention";
export const PER_SIDE = "per side";

// The face_margin a node saved with `savedProperties` means today.
export function marginFromSaved(value, savedProperties) {
  if (savedProperties?.[CONVENTION_PROPERTY] === PER_SIDE || typeof value !== "number") {
    return value;
  }
  return value / 2;
}
