"""DIIR benchmark, measured side by side in one run (run by hand: python bench/bench_diir.py).

Time to restore one face with DIIR Face Restore at SD1.5's crop size (512 px) and its default settings (20 steps,
strength 0.45, cfg 4, one identity through Multi-ID Attention), everything included: crop, VAE encode, inversion
(cfg 1), denoising with the identity (cfg 4), VAE decode, colour matching and paste; over one plain sampling of the
same number of steps at that size (cfg 4, euler, no VAE). On SD1.5's UNet architecture with random weights (by
default exactly SD1.5's: model_channels 320, channel_mult 1,2,4,4, 8 heads) and a random VAE in SD1.5's KL layout
(84 M parameters), on the astronaut's face. Goal: at most 1.2. --repeats interleaved rounds, the best time kept.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import harness  # noqa: E402

from magic_portrait import comfy_env  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_unet_arguments(parser)
    parser.add_argument("--crop", type=int, default=512, help="DIIR crop size (SD1.5's native 512)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.45)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    runtime = comfy_env.boot(cpu=True)
    import comfy.samplers
    import numpy as np
    import torch
    from skimage import data

    from magic_portrait import tiny
    from magic_portrait.tiny_ipadapter import write_tiny_ipadapter

    pack = runtime.pack
    runs, mgmica_patch, unet_layers = pack.nodes.inversion_sampling, pack.nodes.mgmica_patch, pack.nodes.unet_layers
    diir_node = pack.nodes.diir.DIIRFaceRestore
    torch.set_grad_enabled(False)

    model, channel_mult, n_params = harness.build_unet(args)
    vae = tiny.build_sd_vae(seed=0)
    layers = unet_layers.cross_attention_layers(model)
    with tempfile.TemporaryDirectory() as folder:
        path = write_tiny_ipadapter(Path(folder) / "bench-faceid_sd15.safetensors", variant="faceid", family="sd15",
                                    layer_inner_dims=[layer.inner_dim for layer in layers], seed=0)
        adapter = pack.magic_core.ipadapter.load_ipadapter_file(path)
    g = torch.Generator().manual_seed(0)
    embeds = mgmica_patch.IDEmbeds(adapter, torch.randn(1, 4, 768, generator=g), torch.randn(1, 4, 768, generator=g), "id")
    identity = mgmica_patch.Identity(embeds, pack.magic_core.regions.Box(0.0, 0.0, 1.0, 1.0), 1.0, 0.0, 1.0, "person")
    image = torch.from_numpy(np.array(data.astronaut())).float()[None] / 255.0
    analyzer = pack.magic_core.face_backends.DlibAnalyzer("hog")
    faces = pack.nodes.faces.DetectFaces.execute(face_analysis=analyzer, image=image, det_size=640,
                                                 score_threshold=0.5, min_size=0, max_faces=0, retry_smaller=True,
                                                 if_no_face="error").result[0]
    positive, negative = tiny.sd15_cond(0), tiny.sd15_cond(1)
    size = args.crop // 8
    x = torch.randn(1, 4, size, size, generator=g)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", args.steps).cpu()

    def plain():
        runs.guided_run(model, positive, negative, args.cfg, x * sigmas[0], comfy.samplers.sampler_object("euler"),
                          sigmas)

    def restore():
        diir_node.execute(image=image, faces=faces, model=model, vae=vae, positive=positive, negative=negative,
                          identities=(identity,), face_indices="all", margin=0.6, crop_size=args.crop,
                          scheduler="normal", steps=args.steps, strength=args.strength, cfg=args.cfg,
                          inversion_mode="ddim", grow=0.1, feather=0.06, color_match="mean_std",
                          identity_match="by index", identity_weight=1.0, condition_style="openpose_face",
                          control_strength=0.6, if_no_face="return unchanged")

    def encode_decode():
        vae.decode(vae.encode(torch.rand(1, args.crop, args.crop, 3, generator=g)))

    variants = {"plain": plain, "diir": restore, "vae": encode_decode}
    with torch.inference_mode():
        times = harness.time_rounds(variants, args.repeats)
    best = harness.best_times(times)
    covered = len(pack.magic_core.inversion.inversion_sigmas(runs.schedule(model, "normal", args.steps,
                                                                           args.strength))) - 1
    print(f"DIIR bench: SD1.5 UNet structure, model_channels {args.width}, channel_mult {channel_mult}, {args.heads} "
          f"heads ({n_params / 1e6:.0f} M parameters), random SD1.5 KL VAE; crop {args.crop} px, {args.steps} steps, "
          f"strength {args.strength} ({covered} inversion + {covered} denoising steps), cfg {args.cfg}; best of "
          f"{args.repeats}, CPU threads {torch.get_num_threads()}")
    print()
    print("| measure | s | / plain sampling | goal |")
    print("|---|--:|--:|---|")
    print(f"| plain sampling, {args.steps} euler steps at {args.crop} px, cfg {args.cfg} | {best['plain']:.1f} | 1.00 | |")
    print(f"| DIIR, one face: crop, encode, invert, denoise with its identity, decode, colour, paste | "
          f"{best['diir']:.1f} | {best['diir'] / best['plain']:.2f} | <= 1.2 |")
    print(f"| of which the VAE (encode + decode at {args.crop} px) | {best['vae']:.1f} | "
          f"{best['vae'] / best['plain']:.2f} | |")


if __name__ == "__main__":
    main()
