"""Regenerate example_workflows/*.json from the nodes' schemas: python scripts/make_workflows.py

Each workflow uses a standard SD1.5 checkpoint name; the headless runner's --make-tiny-checkpoint writes a
tiny random stand-in under that name for smoke runs (its outputs are noise)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from magic_portrait import comfy_env  # noqa: E402
from magic_portrait.workflow_builder import Workflow  # noqa: E402

CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
CONTENT_IMAGE = "magic_portrait_astronaut.png"
STYLE_IMAGE = "magic_portrait_style.png"


def base(wf: Workflow, image: str = CONTENT_IMAGE, prompt: str = ""):
    wf.column = 0
    ckpt = wf.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    text = wf.encode_text(ckpt.out("CLIP"), prompt, "Inversion prompt (empty)")
    load = wf.node("LoadImage", image=image, title="Content image")
    wf.column = 1
    encode = wf.encode_image(load.out("IMAGE"), ckpt.out("VAE"))
    return ckpt, text, encode


def invert_reconstruct(classes) -> Workflow:
    wf = Workflow(classes)
    wf.note("DDIM inversion round trip (Magic Portrait).\n\nThe portrait is encoded, inverted to noise along a 50-step "
            "schedule with fixed-point refinement (3 extra solves per step), then sampled back exactly. Both nodes "
            "show the measured round-trip error. Try mode = edict for an exact round trip, or ddim for the fastest.\n\n"
            "Needs an SD1.5 checkpoint (v1-5-pruned-emaonly-fp16.safetensors or any other) in models/checkpoints.",
            column=0)
    ckpt, text, encode = base(wf)
    wf.column = 2
    invert = wf.node("MagicPortrait_DDIMInvert", steps=50, mode="fixed_point", refine_iterations=3,
                     measure_round_trip=True)
    wf.connect(ckpt.out("MODEL"), invert, "model")
    wf.connect(text.out(0), invert, "positive")
    wf.connect(encode.out(0), invert, "latent")
    back = wf.node("MagicPortrait_SampleInverted", measure_error=True)
    wf.connect(ckpt.out("MODEL"), back, "model")
    wf.connect(invert.out("inversion"), back, "inversion")
    wf.column = 3
    wf.decode_and_save(back.out(0), ckpt.out("VAE"), "magic_portrait/reconstruction")
    wf.group("Load and encode", [0, 1])
    wf.group_columns("Invert, then sample back", "Decode and save", start=2)
    return wf


def invert_with_core_sampler_custom(classes) -> Workflow:
    """The inversion as SAMPLERs inside ComfyUI's own SamplerCustom (add_noise off), invert then reverse."""
    wf = Workflow(classes)
    wf.note("DDIM inversion inside ComfyUI's own SamplerCustom (Magic Portrait).\n\nThe first SamplerCustom uses the "
            "DDIM Inversion Sampler to turn the encoded portrait into noise (add_noise off); the second uses the "
            "Inverted Latent Sampler to sample it back exactly on the same BasicScheduler sigmas.\n\nNeeds an SD1.5 "
            "checkpoint in models/checkpoints.", column=0)
    ckpt, text, encode = base(wf)
    wf.column = 2
    sigmas = wf.node("BasicScheduler", steps=30)
    wf.connect(ckpt.out("MODEL"), sigmas, "model")
    invert_sampler = wf.node("MagicPortrait_InversionSampler", mode="fixed_point", refine_iterations=2)
    reverse_sampler = wf.node("MagicPortrait_InvertedSampler")
    wf.column = 3
    invert = wf.node("SamplerCustom", title="Invert (SamplerCustom)", add_noise=False, cfg=1.0)
    back = wf.node("SamplerCustom", title="Reconstruct (SamplerCustom)", add_noise=False, cfg=1.0)
    for node, sampler, latent in ((invert, invert_sampler, encode.out(0)), (back, reverse_sampler, invert.out(0))):
        wf.connect(ckpt.out("MODEL"), node, "model")
        wf.connect(text.out(0), node, "positive")
        wf.connect(text.out(0), node, "negative")
        wf.connect(sampler.out(0), node, "sampler")
        wf.connect(sigmas.out(0), node, "sigmas")
        wf.connect(latent, node, "latent_image")
    wf.column = 4
    wf.decode_and_save(back.out(0), ckpt.out("VAE"), "magic_portrait/reconstruction_sampler_custom")
    wf.group("Load and encode", [0, 1])
    wf.group_columns("Schedule and samplers", "Invert, then sample back (SamplerCustom)", "Decode and save", start=2)
    return wf


WORKFLOWS = {
    "ddim_invert_reconstruct.json": invert_reconstruct,
    "ddim_invert_sampler_custom.json": invert_with_core_sampler_custom,
}


def _collect_workflows() -> dict:
    """Each scripts/workflows_*.py module contributes a WORKFLOWS dict {file name: build(node_classes)}."""
    import importlib.util

    found = dict(WORKFLOWS)
    for path in sorted(Path(__file__).parent.glob("workflows_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found.update(module.WORKFLOWS)
    return found


def main() -> None:
    comfy_env.boot()
    import nodes

    out_dir = REPO / "example_workflows"
    out_dir.mkdir(exist_ok=True)
    for name, build in _collect_workflows().items():
        build(nodes.NODE_CLASS_MAPPINGS).save(out_dir / name)
        print("wrote", out_dir / name)


if __name__ == "__main__":
    main()
