"""RepControlNet nodes: load a control file, merge it into a MODEL clone (zero extra cost per step), train one.

- Load RepControlNet: a file from ``models/magic_repcontrolnet`` (``.safetensors``, format in magic_core.repcontrolnet).
- Apply RepControlNet: ``W' = alpha*W + beta*W_m`` as reversible weight-adapter patches on a clone, computed when
  ComfyUI patches each weight (no stored difference per layer), and the condition adapter's features added to the
  output of input block 0 (an ``input_block_patch``); the patch objects are in repcontrolnet_patch.py. The adapter
  runs once per sampling run and latent size. ComfyUI's CheckpointSave saves the merged weights; such a checkpoint is
  used with ``merge_weights`` off (adapter features only).
- Apply RepControlNet also reports the modalities a file was trained on (its ``trained_modalities`` metadata) and
  checks the condition's ``condition_modality`` against them (an error or a warning, by option).
- Train RepControlNet: modal weights + adapter on (image, condition) pairs or a MagicID dataset from a folder under
  ComfyUI's input folder, base frozen, with progress, checkpoints, resume and a loss log; MagicID's Multi-Mode Fusion
  schedules, Clone Face Tuning and the face-weighted loss by option (magic_core.mmf); saves the result into
  ``models/magic_repcontrolnet``.
  The loop is magic_core.repcontrolnet_train (also behind ``python -m magic_portrait train``), its ComfyUI side
  repcontrolnet_training.py.
"""

from __future__ import annotations

from pathlib import Path, PureWindowsPath

import comfy.model_management
import comfy.patcher_extension
import comfy.utils
import folder_paths
import torch
from comfy_api.v0_0_2 import io, ui

from ..magic_core import mmf, train_data
from ..magic_core import repcontrolnet as rcn
from ..magic_core import repcontrolnet_train as rcn_train
from . import repcontrolnet_training as training
from .common import CATEGORY, PREFIX, NodeInputError, model_family, register_model_folder
from .input_folders import resolve_input_folder
from .repcontrolnet_patch import AdapterFeatures, RunScope, add_merge_patches
from .types import LossMapType, RepControlNetType

FOLDER = "magic_repcontrolnet"
EXTENSIONS = {".safetensors"}
WRAPPER_KEY = "magic_portrait.repcontrolnet"
IMAGE_EXTENSIONS = train_data.IMAGE_EXTENSIONS
CONDITION_SUFFIXES = train_data.CONDITION_SUFFIXES
BUNDLED_DATASET = "magic_portrait_repcontrolnet_dataset"  # copied into the input folder by example_inputs.py


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
                io.Combo.Input("condition_modality", options=list(mmf.APPLY_MODALITIES), default="any", optional=True,
                               tooltip="What the condition image shows (skeleton, landmark or both merged): checked "
                               "against the modalities the file was trained on. any: not checked."),
                io.Combo.Input("untrained_modality", options=["error", "warn"], default="error", optional=True,
                               tooltip="A condition of a modality the file was not trained on: an error, or a "
                               "warning in the node's text."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, repcontrolnet, image, strength, merge_weights=True, condition_modality="any",
                untrained_modality="error") -> io.NodeOutput:
        node = cls.define_schema().node_id
        # apply first: it checks the file against the MODEL (patches on a clone, nothing computed per layer)
        patched, _ = apply_repcontrolnet(model, repcontrolnet, image, strength, merge_weights=merge_weights,
                                         node=node)
        text = modality_report(node, repcontrolnet, condition_modality, untrained_modality)
        return io.NodeOutput(patched, ui=ui.PreviewText(text))


def modality_report(node: str, loaded: LoadedRepControlNet, condition_modality: str, untrained_modality: str) -> str:
    """Apply RepControlNet's text: the modalities the file was trained on, and whether the condition is one of them
    (an error naming the node and input, or a warning, for one it was not trained on)."""
    meta = loaded.weights.metadata
    trained = mmf.trained_modalities(meta)
    if trained is None:
        kind = loaded.weights.condition_type or "not recorded"
        text = f"{loaded.name}: trained on single-condition pairs (condition type: {kind})"
        if condition_modality != "any":
            text += f"; the file records no modalities, so the {condition_modality} condition is not checked"
        return text
    text = f"{loaded.name}: trained on {', '.join(trained)} ({meta.get('training_conditions', 'schedule not recorded')})"
    if condition_modality == "any" or mmf.accepts(trained, condition_modality):
        return text + ("" if condition_modality == "any" else f"; condition: {condition_modality}")
    message = (f"the condition is a {condition_modality} image but {loaded.name} was trained on "
               f"{', '.join(trained)} only")
    if untrained_modality == "error":
        raise NodeInputError(node, "condition_modality", message + ": use a file trained on it (modality_schedule "
                             "alternate, random or merged on a MagicID dataset), or set untrained_modality to warn")
    return text + f"; WARNING: {message}"


# -------------------------------------------------------------------------------------------------------- training


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


find_pairs = train_data.find_pairs  # (image, condition) pairs of a folder; kept here for scripts
_context_from = training.context_from
make_unet_forward = training.make_unet_forward


def _load_image(path: Path, size: int) -> torch.Tensor:
    """(1, size, size, 3) in [0, 1]: RGB, centre-cropped to a square, resized (a ComfyUI IMAGE)."""
    return train_data.load_image(path, size).permute(1, 2, 0).unsqueeze(0)


def open_dataset(node: str, folder: Path, resolution: int, *, clone_face_probability: float = 0.0,
                 face_loss_weight: float = 0.0, magicid_crop: str = "random"):
    """The training source in ``folder``: a MagicID dataset, (image, condition) pairs, a SaveTrainingDataset folder
    or tar shards."""
    if not folder.is_dir():
        raise NodeInputError(node, "dataset_folder", f"'{folder}' is not a folder: put NAME.png + "
                             "NAME_condition.png pairs in a folder inside ComfyUI's input folder and name it here "
                             f"(the pack copies its own small set there as {BUNDLED_DATASET} when ComfyUI starts)")
    try:
        return mmf.open_training_source(folder, resolution, clone_face_probability=clone_face_probability,
                                        face_loss_weight=face_loss_weight, crop=magicid_crop)
    except ValueError as err:
        raise NodeInputError(node, getattr(err, "option", "dataset_folder"), str(err)) from None


def schedule_options(node: str, source, modality_schedule: str, modality_weights: str, seed: int) -> dict:
    try:
        return mmf.loop_options(source, modality_schedule, modality_weights, seed)
    except ValueError as err:
        raise NodeInputError(node, getattr(err, "option", "modality_schedule"), str(err)) from None


class TrainRepControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PREFIX + "TrainRepControlNet",
            display_name="Train RepControlNet (Magic Portrait)",
            category=CATEGORY + "/repcontrolnet",
            description="Train a RepControlNet (modal weights + condition adapter, base model frozen) on a dataset "
            "folder inside ComfyUI's input folder: images/NAME.png with conditions/NAME.png, or NAME.png with "
            "NAME_condition.png side by side; also a SaveTrainingDataset folder (pre-encoded latents, condition "
            "images in conditions/) or .tar shards. Saves models/magic_repcontrolnet/<name>.safetensors, "
            "checkpoints and a loss log (losses.jsonl) in models/magic_repcontrolnet/<name>_training/; resume "
            "continues there. The same training runs on several GPUs or machines with "
            "`torchrun ... -m magic_portrait train` (same files, same resume).",
            is_output_node=True,
            not_idempotent=True,
            inputs=[
                io.Model.Input("model"),
                io.Vae.Input("vae"),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning used for every training pair (a "
                                      "SaveTrainingDataset's samples bring their own)."),
                io.String.Input("dataset_folder", default=BUNDLED_DATASET,
                                tooltip="A folder inside ComfyUI's input folder holding NAME.png + NAME_condition.png "
                                "pairs (or images/ + conditions/), a SaveTrainingDataset folder or .tar shards. The "
                                "default is the small set the pack copies there. Absolute paths only when the server "
                                "sets MAGIC_PORTRAIT_ALLOW_ABSOLUTE_DATASET=1."),
                io.String.Input("name", default="my_repcontrolnet",
                                tooltip="File name (without .safetensors), saved in models/magic_repcontrolnet."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=8,
                             tooltip="Images and conditions are centre-cropped and resized to this square size "
                             "(pre-encoded latents keep theirs)."),
                io.Combo.Input("layers", options=list(rcn.LAYER_PRESETS), default="encoder"),
                io.Float.Input("alpha", default=0.5, min=0.0, max=1.0, step=0.01),
                io.Float.Input("beta", default=0.5, min=0.01, max=1.0, step=0.01),
                io.Int.Input("adapter_channels", default=128, min=8, max=1024),
                io.String.Input("condition_type", default="landmarks"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.Int.Input("checkpoint_every", default=100, min=0, max=1_000_000, tooltip="0: only at the end."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue from the latest checkpoint of this name, if there is one (also one "
                                 "written by a multi-GPU run). Off: start over; the earlier run's checkpoints move "
                                 "to <name>_training/previous_run/."),
                io.Int.Input("gradient_accumulation", default=1, min=1, max=1024, optional=True,
                             tooltip="Micro-batches per optimizer step: the effective batch is batch_size x this."),
                io.Combo.Input("mixed_precision", options=list(rcn_train.MIXED_PRECISION), default="no",
                               optional=True, tooltip="Autocast the forward pass to bf16 or fp16 (fp16 with a "
                               "gradient scaler); the trained weights stay float32."),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="Recompute the UNet's blocks in the backward pass instead of keeping their "
                                 "activations: much less memory, about a third more time."),
                io.Combo.Input("modality_schedule", options=list(mmf.SCHEDULES), default="single", optional=True,
                               tooltip="MagicID's Multi-Mode Fusion: which condition each step trains with. single: "
                               "the one condition (a MagicID dataset: its landmarks); alternate: skeleton, landmark, "
                               "skeleton, ...; random: drawn with modality_weights; merged: both in one image. One "
                               "shared adapter learns every modality."),
                io.String.Input("modality_weights", default=mmf.DEFAULT_WEIGHTS, optional=True,
                                tooltip="For the random schedule: modality=weight, e.g. 'skeleton=1, landmark=1' "
                                "(merged too)."),
                io.Float.Input("clone_face_probability", default=0.0, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Clone Face Tuning (MagicID datasets): the chance that a sample has one face "
                               "cloned to a free place with both conditions redrawn there. 0: off."),
                io.Float.Input("face_loss_weight", default=0.0, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="Face-weighted loss (MagicID datasets): faces weigh 1 + this times the "
                               "background (each sample's weights average 1). 0: the plain loss."),
                io.Combo.Input("magicid_crop", options=list(mmf.CROPS), default="random", optional=True,
                               tooltip="MagicID datasets: where each picture is cut to the training square. random: "
                               "a new place every step (from the seed), so the people at the sides of a wide group "
                               "photo are trained too; center: the middle every time, as pair folders (latents "
                               "cached)."),
            ],
            outputs=[RepControlNetType.Output(display_name="repcontrolnet"), LossMapType.Output(display_name="loss")],
        )

    @classmethod
    def execute(cls, model, vae, positive, dataset_folder, name, steps, learning_rate, batch_size, resolution,
                layers, alpha, beta, adapter_channels, condition_type, seed, checkpoint_every,
                resume, gradient_accumulation=1, mixed_precision="no", gradient_checkpointing=False,
                modality_schedule="single", modality_weights=mmf.DEFAULT_WEIGHTS, clone_face_probability=0.0,
                face_loss_weight=0.0, magicid_crop="random") -> io.NodeOutput:
        node = cls.define_schema().node_id
        name = trained_file_name(node, name)
        if resolution % 8:
            raise NodeInputError(node, "resolution", f"must be a multiple of 8, got {resolution}")
        source = open_dataset(node, resolve_input_folder(node, "dataset_folder", dataset_folder, example=BUNDLED_DATASET,
                                                           fill_hint="copy or link your pairs there"), resolution,
                              clone_face_probability=clone_face_probability, face_loss_weight=face_loss_weight,
                              magicid_crop=magicid_crop)
        schedule = schedule_options(node, source, modality_schedule, modality_weights, seed)
        out_dir = Path(folder_paths.get_folder_paths(FOLDER)[0])
        target = out_dir / f"{name}.safetensors"
        ckpt_dir = out_dir / f"{name}_training"
        try:
            result = training.run_training(
                model, vae, positive, source, steps=steps, lr=learning_rate, batch_size=batch_size,
                grad_accumulation=gradient_accumulation, preset=layers, alpha=alpha, beta=beta,
                adapter_channels=adapter_channels, condition_type=condition_type, seed=seed, checkpoint_dir=ckpt_dir,
                checkpoint_every=checkpoint_every, resume_from=ckpt_dir if resume else None, resume_optional=True,
                mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, **schedule)
        except ValueError as err:
            raise NodeInputError(node, "resume" if resume and "resume" in str(err) else "dataset_folder",
                                 str(err)) from None
        training.save_trained(target, result.weights)
        folder_paths.filename_list_cache.pop(FOLDER, None)
        losses = result.losses
        how = f"resumed at step {result.step - result.stats.steps}" if result.resumed_from else "fresh"
        trained = result.weights.metadata.get("trained_modalities")
        how += f"; modalities {trained} ({result.weights.metadata.get('training_conditions')})" if trained else ""
        report = (f"trained {source.describe()} to step {result.step} ({how}); loss {losses[0]:.4f} -> "
                  f"{sum(losses[-10:]) / len(losses[-10:]):.4f} (mean of the last 10); saved {target}; checkpoints "
                  f"and losses.jsonl in {ckpt_dir}") if losses else f"saved {target}"
        loaded = LoadedRepControlNet(result.weights, target.name)
        return io.NodeOutput(loaded, {"loss": list(losses)}, ui=ui.PreviewText(report))


def train(model, vae, positive, pairs, *, steps, lr=1e-4, batch_size=1, resolution=512, preset="encoder", alpha=0.5,
          beta=0.5, adapter_channels=128, condition_type="", seed=0, checkpoint_dir=None, checkpoint_every=0,
          resume_from=None, node=PREFIX + "TrainRepControlNet", on_progress=None,
          **options) -> rcn_train.TrainResult:
    """Train on ``pairs`` [(image path, condition path)]: the node's work, callable from scripts (``options``: see
    repcontrolnet_training.run_training)."""
    samples = [{"key": Path(image).stem, "image": Path(image), "conditions": {train_data.CONDITION: Path(cond)}}
               for image, cond in pairs]
    try:
        source = train_data.PairFolderSamples(samples, resolution)
        return training.run_training(model, vae, positive, source, steps=steps, lr=lr, batch_size=batch_size,
                                     preset=preset, alpha=alpha, beta=beta, adapter_channels=adapter_channels,
                                     condition_type=condition_type, seed=seed, checkpoint_dir=checkpoint_dir,
                                     checkpoint_every=checkpoint_every, resume_from=resume_from,
                                     on_progress=on_progress, **options)
    except ValueError as err:
        raise NodeInputError(node, "resume" if resume_from is not None else "model", str(err)) from None


NODES = [LoadRepControlNet, ApplyRepControlNet, TrainRepControlNet]
