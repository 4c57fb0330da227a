"""RepControlNet nodes: load a control file, merge it into a MODEL clone (zero extra cost per step), train one.

- Load RepControlNet: a file from ``models/magic_repcontrolnet`` (``.safetensors``, format in magic_core.repcontrolnet).
- Apply RepControlNet: ``W' = alpha*W + beta*W_m`` as reversible weight-adapter patches on a clone, computed when
  ComfyUI patches each weight (no stored difference per layer), and the condition adapter's features added to the
  output of input block 0 (an ``input_block_patch``); the patch objects are in repcontrolnet_patch.py. The adapter
  runs once per sampling run and latent size. ComfyUI's CheckpointSave saves the merged weights; such a checkpoint is
  used with ``merge_weights`` off (adapter features only).
- Train RepControlNet: modal weights + adapter on (image, condition) pairs from a folder under ComfyUI's input folder,
  base frozen, with progress, checkpoints, resume and a loss log; saves the result into ``models/magic_repcontrolnet``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path, PurePosixPath, PureWindowsPath

import comfy.model_management
import comfy.patcher_extension
import comfy.utils
import folder_paths
import torch
from comfy_api.v0_0_2 import io, ui

from ..magic_core import repcontrolnet as rcn
from ..magic_core import repcontrolnet_train as rcn_train
from .common import CATEGORY, PREFIX, NodeInputError, model_family, register_model_folder
from .repcontrolnet_patch import AdapterFeatures, RunScope, add_merge_patches

FOLDER = "magic_repcontrolnet"
EXTENSIONS = {".safetensors"}
WRAPPER_KEY = "magic_portrait.repcontrolnet"
RepControlNetType = io.Custom("MAGIC_REPCONTROLNET")
LossMapType = io.Custom("LOSS_MAP")  # the type ComfyUI's LossGraphNode plots
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CONDITION_SUFFIXES = ("_condition", "_cond", "_control")
BUNDLED_DATASET = "magic_portrait_repcontrolnet_dataset"  # copied into the input folder by example_inputs.py
ALLOW_ABSOLUTE_DATASET_ENV = "MAGIC_PORTRAIT_ALLOW_ABSOLUTE_DATASET"


def register_folder() -> None:
    """Register ``models/magic_repcontrolnet`` (idempotent; keeps paths a user's extra_model_paths added first)."""
    register_model_folder(FOLDER, EXTENSIONS)


register_folder()


class LoadedRepControlNet:
    """What flows through a MAGIC_REPCONTROLNET socket: the weights and the file they came from."""

    def __init__(self, weights: rcn.RepControlNetWeights, name: str):
        self.weights = weights
        self.name = name

    def __repr__(self) -> str:
        return f"<RepControlNet {self.name}: {self.weights.describe()}>"


# -------------------------------------------------------------------------------------------------------- applying


def check_fits(node: str, model, loaded: LoadedRepControlNet, input_name: str = "repcontrolnet") -> None:
    if not isinstance(loaded, LoadedRepControlNet):
        raise NodeInputError(node, input_name, "expected a MAGIC_REPCONTROLNET from Load RepControlNet (Magic Portrait)")
    shapes = {k: tuple(v.shape) for k, v in model.model.diffusion_model.state_dict().items()}
    try:
        rcn.validate_against_unet(loaded.weights, shapes, model_family(model), loaded.name)
    except ValueError as err:
        raise NodeInputError(node, input_name, str(err)) from None


def condition_tensor(node: str, image, input_name: str = "image") -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        raise NodeInputError(node, input_name, "expected an IMAGE (batch, height, width, channels)")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.shape[0] == 0:
        raise NodeInputError(node, input_name, "the image batch is empty")
    if image.shape[-1] not in (1, 3, 4):
        raise NodeInputError(node, input_name, f"expected 1, 3 or 4 channels, got {image.shape[-1]}")
    if image.shape[1] < 8 or image.shape[2] < 8:
        raise NodeInputError(node, input_name, f"image {image.shape[2]}x{image.shape[1]} is smaller than 8x8 pixels")
    image = image[..., :3] if image.shape[-1] >= 3 else image.expand(*image.shape[:-1], 3)
    # clone: the executor runs nodes in inference mode, the condition is reused by later runs
    return rcn.image_bhwc_to_bchw(image.detach().to("cpu", torch.float32)).clone()


def apply_repcontrolnet(model, loaded: LoadedRepControlNet, image, strength: float, *, merge_weights: bool = True,
                        node: str = PREFIX + "ApplyRepControlNet"):
    """A clone of ``model`` with the merge as weight patches and the adapter as an input_block_patch."""
    check_fits(node, model, loaded)
    condition = condition_tensor(node, image)
    out = model.clone()
    if strength == 0.0:
        return out, None
    if merge_weights:
        merge, added = add_merge_patches(out, loaded.weights, strength)
        if len(added) != len(merge.terms):
            missing = sorted(set(merge.terms) - set(added))
            raise NodeInputError(node, "repcontrolnet", f"{len(missing)} keys could not be patched: {missing[:5]}")
    patch = AdapterFeatures(loaded.weights, condition, strength, node)
    out.set_model_input_block_patch(patch)
    out.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, RunScope(patch))
    return out, patch


# ----------------------------------------------------------------------------------------------------------- nodes


class LoadRepControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "LoadRepControlNet",
            display_name="Load RepControlNet (Magic Portrait)",
            category=CATEGORY + "/repcontrolnet",
            description="Load a RepControlNet file (.safetensors) from models/magic_repcontrolnet: a condition adapter "
            "plus modal weights that Apply RepControlNet merges into the UNet.",
            inputs=[io.Combo.Input("repcontrolnet_name", options=folder_paths.get_filename_list(FOLDER))],
            outputs=[RepControlNetType.Output(display_name="repcontrolnet")],
        )

    @classmethod
    def execute(cls, repcontrolnet_name) -> io.NodeOutput:
        node = cls.define_schema().node_id
        if not str(repcontrolnet_name).lower().endswith(".safetensors"):
            raise NodeInputError(node, "repcontrolnet_name", f"'{repcontrolnet_name}' is not a .safetensors file "
                                 "(RepControlNet files are safetensors; nothing else is loaded)")
        path = folder_paths.get_full_path(FOLDER, repcontrolnet_name)
        if path is None:
            where = ", ".join(folder_paths.get_folder_paths(FOLDER))
            raise NodeInputError(node, "repcontrolnet_name", f"'{repcontrolnet_name}' was not found in {where}")
        try:
            weights = rcn.load_repcontrolnet(path)
        except ValueError as err:
            raise NodeInputError(node, "repcontrolnet_name", str(err)) from None
        loaded = LoadedRepControlNet(weights, repcontrolnet_name)
        return io.NodeOutput(loaded, ui=ui.PreviewText(weights.describe()))


class ApplyRepControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "ApplyRepControlNet",
            display_name="Apply RepControlNet (Magic Portrait)",
            category=CATEGORY + "/repcontrolnet",
            description="Merge a RepControlNet into a copy of MODEL (W' = alpha*W + beta*W_m as reversible weight "
            "patches) and add the condition image's adapter features to the UNet's first block. Sampling costs what "
            "the base model costs. Save the merged model with CheckpointSave; use such a checkpoint with "
            "merge_weights off.",
            inputs=[
                io.Model.Input("model"),
                RepControlNetType.Input("repcontrolnet"),
                io.Image.Input("image", tooltip="The condition image (landmarks, pose, edges ...); a batch of 1 is "
                               "used for every latent, or one per latent."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="0: the base model; 1: the full merge; in between: linear."),
                io.Boolean.Input("merge_weights", default=True,
                                 tooltip="Off: add only the adapter features (for a checkpoint saved already merged)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, repcontrolnet, image, strength, merge_weights=True) -> io.NodeOutput:
        node = cls.define_schema().node_id
        patched, _ = apply_repcontrolnet(model, repcontrolnet, image, strength, merge_weights=merge_weights,
                                         node=node)
        return io.NodeOutput(patched)


# -------------------------------------------------------------------------------------------------------- training


def allows_absolute_dataset() -> bool:
    """Whether the server opted in to absolute dataset paths (``MAGIC_PORTRAIT_ALLOW_ABSOLUTE_DATASET=1``)."""
    return os.environ.get(ALLOW_ABSOLUTE_DATASET_ENV, "").strip().lower() in ("1", "true", "yes")


def resolve_dataset_folder(node: str, value: str) -> Path:
    """The folder a Train node's ``dataset_folder`` names: a path relative to ComfyUI's input folder, without '..'.

    On a shared server anyone who can queue a prompt sets this string, so it must not reach other folders: an
    absolute path (or ``~``) is refused unless the server opted in with MAGIC_PORTRAIT_ALLOW_ABSOLUTE_DATASET=1.
    Symlinks already inside the input folder are followed: whoever placed one there can read its target anyway."""
    text = str(value).strip()
    input_dir = Path(folder_paths.get_input_directory())
    where = f"ComfyUI's input folder ({input_dir})"
    if not text:
        raise NodeInputError(node, "dataset_folder", f"is empty: name a folder inside {where}, e.g. {BUNDLED_DATASET}")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).anchor or text.startswith("~"):
        if allows_absolute_dataset():
            return Path(text).expanduser()
        raise NodeInputError(node, "dataset_folder", f"'{text}' is an absolute path: name a folder inside {where} "
                             f"instead (copy or link your pairs there), or start the server with "
                             f"{ALLOW_ABSOLUTE_DATASET_ENV}=1 to allow absolute paths (only where everyone who can "
                             "queue a prompt may read every folder the server can)")
    if ".." in PurePosixPath(text.replace("\\", "/")).parts:
        raise NodeInputError(node, "dataset_folder", f"'{text}' contains '..': the folder must be inside {where}")
    return input_dir / text


def trained_file_name(node: str, value: str) -> str:
    """The ``name`` input as a plain file stem: the trained file must land in models/magic_repcontrolnet itself."""
    name = str(value).strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name or name.startswith(".") or "/" in name or "\\" in name or PureWindowsPath(name).drive:
        raise NodeInputError(node, "name", f"'{value}' is not a plain file name: the result is saved as "
                             f"models/{FOLDER}/<name>.safetensors, so give a name without folders, '..' or a "
                             "leading '.'")
    return name


def find_pairs(folder: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, condition) pairs of a dataset folder: ``images/NAME.ext`` + ``conditions/NAME.ext`` (matched by file
    stem), or, in one flat folder, ``NAME.ext`` + ``NAME_condition.ext`` (also ``_cond`` / ``_control``)."""
    root = Path(folder)

    def images(d: Path) -> dict[str, Path]:
        return {p.stem: p for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()}

    if (root / "images").is_dir() and (root / "conditions").is_dir():
        pics, conds = images(root / "images"), images(root / "conditions")
        return [(pics[s], conds[s]) for s in sorted(pics) if s in conds]
    found = images(root)
    pairs = []
    for stem, path in sorted(found.items()):
        for suffix in CONDITION_SUFFIXES:
            if stem.endswith(suffix) and stem[: -len(suffix)] in found:
                pairs.append((found[stem[: -len(suffix)]], path))
                break
    return pairs


def _load_image(path: Path, size: int) -> torch.Tensor:
    """(1, size, size, 3) in [0, 1]: RGB, centre-cropped to a square, resized."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
        array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).unsqueeze(0)


def _context_from(model, positive, batch: int, latent_hw, device) -> dict:
    if not isinstance(positive, list) or not positive or not isinstance(positive[0][0], torch.Tensor):
        raise ValueError("positive must be a CONDITIONING (from CLIPTextEncode)")
    cond, extras = positive[0][0], dict(positive[0][1])
    context = {"context": cond[:1].detach().clone().to(device).repeat(batch, 1, 1)}
    extras.setdefault("width", latent_hw[1] * 8)
    extras.setdefault("height", latent_hw[0] * 8)
    adm = model.model.encode_adm(device=device, **extras)
    if adm is not None:
        context["y"] = adm[:1].detach().clone().to(device).repeat(batch, 1)
    return context


def make_unet_forward(model):
    """``unet_forward(params, x_noisy, sigma, context, features) -> denoised`` for train_repcontrolnet, through the
    model's own sampling parameterisation (EPS, V ...) and torch.func.functional_call on its UNet."""
    from torch.func import functional_call

    base = model.model
    unet = base.diffusion_model
    ms = base.model_sampling
    # Tensors the executor created under inference mode cannot be saved for backward: use plain copies of those.
    frozen = {k: v.clone() for k, v in list(unet.named_parameters()) + list(unet.named_buffers()) if v.is_inference()}

    def forward(params, x_noisy, sigma, context, features):
        xc = ms.calculate_input(sigma, x_noisy)
        t = ms.timestep(sigma).float()
        to = {"patches": {"input_block_patch": [
            lambda h, opts: rcn.add_features(h, features) if opts.get("block") == ("input", 0) else h]}}
        kwargs = {"context": context["context"], "transformer_options": to}
        if "y" in context:
            kwargs["y"] = context["y"]
        out = functional_call(unet, {**frozen, **params}, (xc.to(base.get_dtype()), t), kwargs, strict=False)
        return ms.calculate_denoised(sigma, out.float(), x_noisy)

    return forward


class TrainRepControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "TrainRepControlNet",
            display_name="Train RepControlNet (Magic Portrait)",
            category=CATEGORY + "/repcontrolnet",
            description="Train a RepControlNet (modal weights + condition adapter, base model frozen) on (image, "
            "condition) pairs from a folder inside ComfyUI's input folder: images/NAME.png with conditions/NAME.png, "
            "or NAME.png with NAME_condition.png side by side. Saves models/magic_repcontrolnet/<name>.safetensors, "
            "checkpoints and a loss log (losses.jsonl) in models/magic_repcontrolnet/<name>_training/; resume "
            "continues there.",
            is_output_node=True,
            not_idempotent=True,
            inputs=[
                io.Model.Input("model"),
                io.Vae.Input("vae"),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning used for every training pair."),
                io.String.Input("dataset_folder", default=BUNDLED_DATASET,
                                tooltip="A folder inside ComfyUI's input folder holding NAME.png + NAME_condition.png "
                                "pairs (or images/ + conditions/). The default is the small set the pack copies "
                                "there. Absolute paths only when the server sets "
                                "MAGIC_PORTRAIT_ALLOW_ABSOLUTE_DATASET=1."),
                io.String.Input("name", default="my_repcontrolnet",
                                tooltip="File name (without .safetensors), saved in models/magic_repcontrolnet."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=8,
                             tooltip="Images and conditions are centre-cropped and resized to this square size."),
                io.Combo.Input("layers", options=list(rcn.LAYER_PRESETS), default="encoder"),
                io.Float.Input("alpha", default=0.5, min=0.0, max=1.0, step=0.01),
                io.Float.Input("beta", default=0.5, min=0.01, max=1.0, step=0.01),
                io.Int.Input("adapter_channels", default=128, min=8, max=1024),
                io.String.Input("condition_type", default="landmarks"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.Int.Input("checkpoint_every", default=100, min=0, max=1_000_000, tooltip="0: only at the end."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue from the latest checkpoint of this name, if there is one."),
            ],
            outputs=[RepControlNetType.Output(display_name="repcontrolnet"), LossMapType.Output(display_name="loss")],
        )

    @classmethod
    def execute(cls, model, vae, positive, dataset_folder, name, steps, learning_rate, batch_size, resolution,
                layers, alpha, beta, adapter_channels, condition_type, seed, checkpoint_every,
                resume) -> io.NodeOutput:
        node = cls.define_schema().node_id
        name = trained_file_name(node, name)
        folder = resolve_dataset_folder(node, dataset_folder)
        if not folder.is_dir():
            raise NodeInputError(node, "dataset_folder", f"'{folder}' is not a folder: put NAME.png + "
                                 "NAME_condition.png pairs in a folder inside ComfyUI's input folder and name it here "
                                 f"(the pack copies its own small set there as {BUNDLED_DATASET} when ComfyUI starts)")
        pairs = find_pairs(folder)
        if not pairs:
            raise NodeInputError(node, "dataset_folder", f"no (image, condition) pairs in '{folder}': use images/ + "
                                 "conditions/ with matching file names, or NAME.png + NAME_condition.png")
        if resolution % 8:
            raise NodeInputError(node, "resolution", f"must be a multiple of 8, got {resolution}")
        out_dir = Path(folder_paths.get_folder_paths(FOLDER)[0])
        target = out_dir / f"{name}.safetensors"
        ckpt_dir = out_dir / f"{name}_training"
        resume_from = None
        if resume and ckpt_dir.is_dir() and rcn_train.find_latest_checkpoint(ckpt_dir) is not None:
            resume_from = ckpt_dir
        result = train(model, vae, positive, pairs, steps=steps, lr=learning_rate, batch_size=batch_size,
                       resolution=resolution, preset=layers, alpha=alpha, beta=beta, adapter_channels=adapter_channels,
                       condition_type=condition_type, seed=seed, checkpoint_dir=ckpt_dir,
                       checkpoint_every=checkpoint_every, resume_from=resume_from, node=node)
        rcn.save_repcontrolnet(target, result.weights)
        folder_paths.filename_list_cache.pop(FOLDER, None)
        losses = result.losses
        report = (f"trained {len(pairs)} pairs to step {result.step} ({'resumed' if resume_from else 'fresh'}); "
                  f"loss {losses[0]:.4f} -> {sum(losses[-10:]) / len(losses[-10:]):.4f} (mean of the last 10); "
                  f"saved {target}; checkpoints and losses.jsonl in {ckpt_dir}") if losses else f"saved {target}"
        loaded = LoadedRepControlNet(result.weights, target.name)
        return io.NodeOutput(loaded, {"loss": list(losses)}, ui=ui.PreviewText(report))


def train(model, vae, positive, pairs, *, steps, lr=1e-4, batch_size=1, resolution=512, preset="encoder", alpha=0.5,
          beta=0.5, adapter_channels=128, condition_type="", seed=0, checkpoint_dir=None, checkpoint_every=0,
          resume_from=None, node=PREFIX + "TrainRepControlNet", on_progress=None) -> rcn_train.TrainResult:
    """Train on ``pairs`` [(image path, condition path)]: the node's work, callable from scripts."""
    with torch.inference_mode(False), torch.enable_grad():
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        device = model.load_device
        latent_format = model.get_model_object("latent_format")
        latents, conditions = [], []
        with torch.no_grad():
            for image_path, cond_path in pairs:
                image = _load_image(image_path, resolution)
                encoded = vae.encode(image)
                latents.append(latent_format.process_in(encoded.float().cpu()).clone())
                conditions.append(rcn.image_bhwc_to_bchw(_load_image(cond_path, resolution)).clone())
        hw = tuple(latents[0].shape[-2:])
        context = _context_from(model, positive, batch_size, hw, device)
        batches = []
        n = len(pairs)
        for start in range(0, max(n, batch_size), batch_size):
            idx = [(start + i) % n for i in range(batch_size)]
            batches.append({"latent": torch.cat([latents[i] for i in idx]),
                            "condition": torch.cat([conditions[i] for i in idx]), "context": context})
        unet_state = dict(model.model.diffusion_model.state_dict())
        shapes = {k: tuple(v.shape) for k, v in unet_state.items()}
        family = model_family(model)
        layer_keys = rcn.default_layer_keys(shapes, family, preset)
        pbar = comfy.utils.ProgressBar(steps)
        started = time.perf_counter()

        def progress(step, loss):
            comfy.model_management.throw_exception_if_processing_interrupted()
            pbar.update_absolute(step, steps)
            if on_progress is not None:
                on_progress(step, loss)

        table = getattr(model.get_model_object("model_sampling"), "sigmas", None)
        sigmas = None if table is None else table.detach().float().cpu()
        try:
            result = rcn_train.train_repcontrolnet(
                make_unet_forward(model), unet_state, layer_keys, batches, steps=steps, lr=lr, alpha=alpha,
                beta=beta, adapter_config={"out_channels": shapes["input_blocks.0.0.weight"][0],
                                           "hidden_channels": adapter_channels},
                seed=seed, sigmas=sigmas, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                resume_from=resume_from, on_progress=progress, device=device, model_family=family,
                condition_type=condition_type, grad_clip=1.0,
                metadata={"training_pairs": str(len(pairs)), "training_resolution": str(resolution)},
            )
        except ValueError as err:
            raise NodeInputError(node, "resume" if resume_from is not None else "model", str(err)) from None
        result.weights.metadata["training_seconds"] = f"{time.perf_counter() - started:.1f}"
        return result


NODES = [LoadRepControlNet, ApplyRepControlNet, TrainRepControlNet]
