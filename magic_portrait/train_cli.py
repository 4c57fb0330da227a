"""`python -m magic_portrait train`: the Train RepControlNet node's training from the command line, on one process or
many (``torchrun``): the same loop (magic_core.repcontrolnet_train), files, loss log and resume as the node.

ComfyUI is booted headless (magic_portrait.comfy_env); the base checkpoint and VAE are loaded by ComfyUI's own
CheckpointLoaderSimple / VAELoader, by names resolved through folder_paths (``--models-dir`` first), and the prompt
is encoded by CLIPTextEncode. The result goes where the node puts it: ``models/magic_repcontrolnet/NAME.safetensors``,
checkpoints and ``losses.jsonl`` in ``NAME_training/``. Under torchrun every process loads the models once and trains
on its share of each batch; rank 0 alone writes. Exit codes: 0 done, 1 training error, 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import time
from pathlib import Path, PureWindowsPath

EPILOG = """\
datasets (--dataset, by layout):
  a MagicID dataset          what Build MagicID Dataset writes (dataset.json, manifest.jsonl, NAME.png,
                             NAME_landmark.png, NAME_skeleton.png, NAME_facemask.png): --modality-schedule,
                             --clone-face-probability and --face-loss-weight use it
  a folder of pairs          NAME.png + NAME_condition.png, or images/NAME.png + conditions/NAME.png
  a SaveTrainingDataset folder   shard_0000.pkl ... + metadata.json (ComfyUI's MakeTrainingDataset ->
                             SaveTrainingDataset: pre-encoded latents and each sample's prompt), with the condition
                             images in conditions/000000.png ... (the sample's index in shard order)
  tar shards                 a folder of .tar files, a glob, or data/shard-{0000..0999}.tar (webdataset layout:
                             0001.jpg + 0001.condition.png, or 0001.latent.safetensors instead of the image)
  A name that is not a path is looked up in ComfyUI's input and output folders.

one machine, N GPUs:
  torchrun --standalone --nproc-per-node N -m magic_portrait train --gpu --checkpoint sd15.safetensors \\
      --dataset data/ --name my_control --batch-size 4
several machines (run on each; NODE_RANK 0..M-1, HOST:PORT reachable from all):
  torchrun --nnodes M --nproc-per-node N --node-rank NODE_RANK --rdzv-backend c10d \\
      --rdzv-endpoint HOST:29400 --rdzv-id my_control -m magic_portrait train --gpu ...
  Every node needs the models and the dataset at the same paths; checkpoints are written by rank 0 (on the first
  node), which also reads them on resume and sends them to the others.
CPU (gloo): the same without --gpu (torchrun sets one thread per process; --threads changes it).

exit codes: 0 done, 1 training error (message on stderr), 2 usage error."""


OPTIMIZERS = ("adam", "adamw", "sgd")  # as magic_core.repcontrolnet_train (not imported here: --help stays fast)
MIXED_PRECISION = ("no", "bf16", "fp16")
SCHEDULES = ("single", "alternate", "random", "merged")  # magic_core.mmf.SCHEDULES
CROPS = ("random", "center")  # magic_core.mmf.CROPS


class LauncherStopped(RuntimeError):
    """torchrun (or the user) sent SIGTERM: another process of the run failed, or the run was cancelled."""

    dist_peer_failure = True  # magic_core.train_dist.is_peer_failure: not this rank's own error


def add_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        "train",
        help="train a RepControlNet (as the Train RepControlNet node does), on one process or under torchrun",
        description="Train a RepControlNet: modal weights + condition adapter on a frozen base checkpoint, with the "
        "Train RepControlNet node's options, file format, loss log and resume. Start it with torchrun for several "
        "GPUs or machines (DistributedDataParallel, NCCL on GPUs, gloo on CPUs).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", metavar="NAME",
                   help="base checkpoint in models/checkpoints (loaded by CheckpointLoaderSimple); required")
    p.add_argument("--vae", metavar="NAME", help="a VAE in models/vae (VAELoader) instead of the checkpoint's")
    p.add_argument("--dataset", required=True, metavar="PATH", help="the training data (see below)")
    p.add_argument("--name", required=True, help="output file name (models/magic_repcontrolnet/NAME.safetensors)")
    p.add_argument("--prompt", default="", help="prompt for samples without their own (default: empty)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps in total (default 1000)")
    p.add_argument("--learning-rate", "--lr", type=float, default=1e-4, dest="learning_rate")
    p.add_argument("--batch-size", type=int, default=1, help="samples per process and micro-batch (default 1)")
    p.add_argument("--gradient-accumulation", type=int, default=1, metavar="N",
                   help="micro-batches per step: the global batch is processes x batch size x N (default 1)")
    p.add_argument("--resolution", type=int, default=512, help="image size for pairs and tar images (default 512)")
    p.add_argument("--layers", default="encoder", help="layer preset (encoder, encoder_convs, ...; default encoder)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--adapter-channels", type=int, default=128)
    p.add_argument("--condition-type", default="landmarks", help="free text stored in the file (default landmarks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="N", help="0: only at the end (default 100)")
    p.add_argument("--keep-checkpoints", type=int, default=3, metavar="N", help="0 keeps all (default 3)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the latest checkpoint of NAME if there is one (default); --no-resume starts "
                        "over (the earlier checkpoints move to NAME_training/previous_run/)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="no",
                   help="autocast the forward to bf16/fp16 (fp16 with a gradient scaler)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute UNet blocks in the backward pass: much less memory, about 1/3 more time")
    p.add_argument("--modality-schedule", choices=SCHEDULES, default="single",
                   help="MagicID's Multi-Mode Fusion: single (the one condition; a MagicID dataset: its landmarks), "
                        "alternate (skeleton, landmark, ...), random (--modality-weights) or merged (default single)")
    p.add_argument("--modality-weights", default="skeleton=1, landmark=1", metavar="TEXT",
                   help="for --modality-schedule random: modality=weight, ... (default 'skeleton=1, landmark=1')")
    p.add_argument("--clone-face-probability", type=float, default=0.0, metavar="P",
                   help="Clone Face Tuning on a MagicID dataset: the chance a sample gets one face cloned to a free "
                        "place, conditions redrawn (default 0: off)")
    p.add_argument("--face-loss-weight", type=float, default=0.0, metavar="L",
                   help="face-weighted loss on a MagicID dataset: faces weigh 1 + L times the background (default 0)")
    p.add_argument("--magicid-crop", choices=CROPS, default="random",
                   help="where a MagicID dataset's pictures are cut to the training square: random (default: a new "
                        "place every step, from the seed) or center")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off; default 1)")
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes per rank (default 2)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="read samples in file order")
    p.add_argument("--threads", type=int, help="torch threads per process")
    p.add_argument("--timeout-minutes", type=float, default=30.0,
                   help="how long a collective waits for a silent process before the run fails (default 30)")
    p.add_argument("--models-dir", metavar="DIR", help="ComfyUI-style models folder searched first")
    p.add_argument("--comfyui", metavar="PATH", help="ComfyUI folder (default: $COMFYUI_PATH, ~/comfy/ComfyUI, or "
                                                     "the ComfyUI holding this pack)")
    p.add_argument("--gpu", action="store_true", help="train on the GPU (torchrun: one per process; default: CPU)")
    p.add_argument("--verbose", "-v", action="store_true", help="show ComfyUI's log and tracebacks")
    return p


class UsageError(Exception):
    pass


def _plain_name(value: str) -> str:
    name = value.strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name or name.startswith(".") or "/" in name or "\\" in name or PureWindowsPath(name).drive:
        raise UsageError(f"--name '{value}' is not a plain file name (the result is saved as "
                         "models/magic_repcontrolnet/<name>.safetensors)")
    return name


def resolve_dataset(value: str, train_data) -> Path:
    """The dataset path as given, else the same name in ComfyUI's input or output folder (where SaveTrainingDataset
    writes)."""
    import folder_paths

    if os.path.exists(value) or train_data.find_tar_shards(value):
        return Path(value)
    for folder in (folder_paths.get_input_directory(), folder_paths.get_output_directory()):
        candidate = Path(folder) / value
        if candidate.exists() and candidate.resolve().is_relative_to(Path(folder).resolve()):
            return candidate
    raise UsageError(f"--dataset '{value}' not found (nor in ComfyUI's input or output folder)")


def _model_path(kind: str, name: str, flag: str) -> None:
    import folder_paths

    if folder_paths.get_full_path(kind, name) is None:
        where = ", ".join(folder_paths.get_folder_paths(kind))
        raise UsageError(f"{flag} '{name}' was not found in {where} (give --models-dir, or a name relative to one of "
                         "those folders)")


def _pack_module(runtime, name: str):
    """A module of the pack as ComfyUI loaded it (one copy of magic_core for the loop, its errors and its types)."""
    return importlib.import_module(f"{runtime.pack_module_name}.{name}")


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def cli_train(args, *, on_progress=None, load_models=None, out=None, err=None) -> int:
    """Run ``train`` with parsed arguments. ``on_progress(step, loss)`` is called on every rank after each step;
    ``load_models(runtime) -> (MODEL, VAE, CONDITIONING)`` replaces the checkpoint loaders (for scripts that build
    their models themselves; ``--checkpoint``/``--vae``/``--prompt`` are then not used)."""
    out, err = out or sys.stdout, err or sys.stderr
    ctx, dist_module = None, None
    previous = signal.getsignal(signal.SIGTERM)

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the report finish; torchrun kills after 30 s anyway
        if ctx is not None and ctx.reporting:  # already finding out which rank failed: finish that first
            return
        raise LauncherStopped("stopped by SIGTERM (torchrun stops every process when one of them fails)")

    def rank_tag() -> str:
        return f"[rank {ctx.rank}] " if ctx is not None and ctx.is_distributed else ""

    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.gpu and launched_by_torchrun() and torch.cuda.is_available():
            # before ComfyUI starts: it uses the current device, and every rank would open one on GPU 0 otherwise
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        name = _plain_name(args.name)
        for flag, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                                 ("--gradient-accumulation", args.gradient_accumulation, 1),
                                 ("--num-workers", args.num_workers, 0),
                                 ("--checkpoint-every", args.checkpoint_every, 0)):
            if value < low:
                raise UsageError(f"{flag} must be at least {low}, got {value}")
        from . import comfy_env

        if not args.verbose:
            logging.disable(logging.WARNING)  # ComfyUI's start-up warnings (optional core nodes) are not ours
        try:
            runtime = comfy_env.boot(Path(args.comfyui) if args.comfyui else None, cpu=not args.gpu,
                                     models_dir=Path(args.models_dir) if args.models_dir else None,
                                     quiet=not args.verbose)
        finally:
            logging.disable(logging.NOTSET)
        dist_module = _pack_module(runtime, "magic_core.train_dist")
        ctx = dist_module.DistContext.from_env(device="cuda" if args.gpu else "cpu",
                                               timeout_minutes=args.timeout_minutes)
        if ctx.is_distributed:
            signal.signal(signal.SIGTERM, stop)
        return _train(args, name, runtime, ctx, rank_tag(), on_progress, load_models, out)
    except UsageError as exc:
        print(f"magic_portrait train: {rank_tag()}{exc}", file=err)
        return 2
    except Exception as exc:
        if dist_module is not None and isinstance(exc, dist_module.TrainingStopped):
            print(f"magic_portrait train: {rank_tag()}{exc}", file=err, flush=True)
            return 1
        if args.verbose or not isinstance(exc, (ValueError, RuntimeError, OSError)):
            raise
        print(f"magic_portrait train: {rank_tag()}{type(exc).__name__}: {exc}", file=err)
        return 1
    finally:
        if ctx is not None:
            ctx.close()
            if ctx.is_distributed:
                signal.signal(signal.SIGTERM, previous)


def _train(args, name: str, runtime, ctx, tag: str, on_progress, load_models, out) -> int:
    import folder_paths

    import nodes as comfy_nodes

    training = _pack_module(runtime, "nodes.repcontrolnet_training")
    train_data = _pack_module(runtime, "magic_core.train_data")
    mmf = _pack_module(runtime, "magic_core.mmf")
    core_train = _pack_module(runtime, "magic_core.repcontrolnet_train")
    if load_models is None:
        if not args.checkpoint:
            raise UsageError("--checkpoint NAME is required (the base model, from models/checkpoints)")
        _model_path("checkpoints", args.checkpoint, "--checkpoint")
        if args.vae:
            _model_path("vae", args.vae, "--vae")
    dataset = resolve_dataset(args.dataset, train_data)
    try:
        source = mmf.open_training_source(dataset, args.resolution, clone_face_probability=args.clone_face_probability,
                                          face_loss_weight=args.face_loss_weight, crop=args.magicid_crop)
        schedule = mmf.loop_options(source, args.modality_schedule, args.modality_weights, args.seed)
    except ValueError as exc:  # mmf.OptionError names its option; any other error is the dataset's
        raise UsageError(f"--{getattr(exc, 'option', 'dataset').replace('_', '-')}: {exc}") from None
    started = time.perf_counter()
    if load_models is None:
        model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(args.checkpoint)[:3]
        if args.vae:
            vae = comfy_nodes.VAELoader().load_vae(args.vae)[0]
        positive = comfy_nodes.CLIPTextEncode().encode(clip, args.prompt)[0]
    else:
        model, vae, positive = load_models(runtime)
    out_dir = Path(folder_paths.get_folder_paths("magic_repcontrolnet")[0])
    target = out_dir / f"{name}.safetensors"
    ckpt_dir = out_dir / f"{name}_training"
    if ctx.is_main:
        print(f"{tag}training {name}: {source.describe()}; {ctx.describe()} x batch {args.batch_size} x "
              f"accumulation {args.gradient_accumulation} = global batch "
              f"{ctx.world_size * args.batch_size * args.gradient_accumulation}; checkpoints in {ckpt_dir}",
              file=out, flush=True)
    every = max(1, args.steps // 20)
    last = [time.perf_counter()]

    def progress(step, loss):
        if ctx.is_main and (step % every == 0 or step == args.steps):
            now = time.perf_counter()
            print(f"{tag}step {step}/{args.steps} loss {loss:.5f} ({(now - last[0]) / every:.2f} s/step)", file=out,
                  flush=True)
            last[0] = now
        if ctx.is_main and args.checkpoint_every and step % args.checkpoint_every == 0:
            print(f"{tag}checkpoint: {core_train.checkpoint_paths(ckpt_dir, step)['state']}", file=out, flush=True)
        if on_progress is not None:
            on_progress(step, loss)

    result = training.run_training(
        model, vae, positive, source, steps=args.steps, lr=args.learning_rate, batch_size=args.batch_size,
        grad_accumulation=args.gradient_accumulation, preset=args.layers, alpha=args.alpha, beta=args.beta,
        adapter_channels=args.adapter_channels, condition_type=args.condition_type, seed=args.seed,
        checkpoint_dir=ckpt_dir, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        resume_from=ckpt_dir if args.resume else None, resume_optional=True, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer, num_workers=args.num_workers,
        shuffle=args.shuffle, grad_clip=args.grad_clip or None, dist=ctx, on_progress=progress, **schedule)
    if ctx.is_main:
        training.save_trained(target, result.weights)
        stats = result.stats
        resumed = f", resumed from {result.resumed_from}" if result.resumed_from else ""
        print(f"{tag}saved {target} (step {result.step}{resumed}; {stats.samples} samples in "
              f"{time.perf_counter() - started:.1f} s, data wait {100 * stats.data_wait_share:.1f}% of the loop)",
              file=out, flush=True)
    return 0


def main(argv: list[str] | None = None, *, on_progress=None, load_models=None, out=None, err=None) -> int:
    """``python -m magic_portrait train ARGS`` in this process (for scripts, tests and torchrun wrappers)."""
    from .__main__ import build_parser

    argv = list(argv or [])
    if not argv or argv[0] != "train":
        argv = ["train", *argv]
    return cli_train(build_parser().parse_args(argv), on_progress=on_progress, load_models=load_models, out=out,
                     err=err)
