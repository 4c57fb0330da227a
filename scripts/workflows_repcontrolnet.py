"""RepControlNet example workflow (collected by scripts/make_workflows.py).

Load a checkpoint and a RepControlNet, apply it with a condition image, sample, decode, save; a CheckpointSave of the
merged model is included but bypassed (switch it on to write the merged checkpoint)."""

from __future__ import annotations

from magic_portrait.workflow_builder import Workflow

CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
REPCONTROLNET = "my_repcontrolnet_canny.safetensors"  # what the repcontrolnet_train example saves
CONDITION_IMAGE = "magic_portrait_condition.png"
BUNDLED_DATASET = "magic_portrait_repcontrolnet_dataset"  # example_workflows/<this>, copied to ComfyUI/input on load
BUNDLED_SIZE = 192  # the bundled pairs' side (scripts/make_repcontrolnet_dataset.py)
TRAINED_NAME = "my_repcontrolnet_canny"
MODE_BYPASS = 4


def _sample_512(wf: Workflow, model, positive, negative):
    """An empty 512x512 latent and a 25-step KSampler on the controlled model."""
    return wf.sample(model.out(0), positive.out(0), negative.out(0), 512, 512, seed=0, steps=25, cfg=7.0,
                     sampler_name="euler", scheduler="normal", denoise=1.0)


def repcontrolnet_apply(classes) -> Workflow:
    wf = Workflow(classes)
    wf.note("RepControlNet (Magic Portrait).\n\nApply RepControlNet merges the control file's modal weights into a "
            "clone of the model (reversible) and adds its condition adapter once per run, so control costs what the "
            "base model costs. The condition image here is Canny edges of a portrait.\n\nNeeds an SD1.5 checkpoint "
            "in models/checkpoints and a RepControlNet file in models/magic_repcontrolnet: the repcontrolnet_train "
            "example saves my_repcontrolnet_canny there, which this one loads (press R to refresh the list). The bypassed CheckpointSave writes the merged model when enabled.")
    ckpt = wf.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    rcn = wf.node("MagicPortrait_LoadRepControlNet", repcontrolnet_name=REPCONTROLNET)
    cond = wf.node("LoadImage", image=CONDITION_IMAGE, title="Condition image (Canny edges)")
    wf.column = 1
    apply = wf.node("MagicPortrait_ApplyRepControlNet", strength=1.0, merge_weights=True)
    wf.connect(ckpt.out("MODEL"), apply, "model")
    wf.connect(rcn.out(0), apply, "repcontrolnet")
    wf.connect(cond.out("IMAGE"), apply, "image")
    positive = wf.encode_text(ckpt.out("CLIP"), "a portrait photo of a person, studio light", "Positive prompt")
    negative = wf.encode_text(ckpt.out("CLIP"), "blurry, low quality", "Negative prompt")
    wf.column = 2
    sampler = _sample_512(wf, apply, positive, negative)
    wf.column = 3
    wf.decode_and_save(sampler.out(0), ckpt.out("VAE"), "magic_portrait/repcontrolnet")
    merged = wf.node("CheckpointSave", filename_prefix="checkpoints/magic_portrait_repcontrolnet_merged",
                     title="Save merged checkpoint (bypassed: enable to write it)")
    wf.connect(apply.out(0), merged, "model")
    wf.connect(ckpt.out("CLIP"), merged, "clip")
    wf.connect(ckpt.out("VAE"), merged, "vae")
    merged.data["mode"] = MODE_BYPASS
    wf.group_columns("Model, control file and condition", "Merge and prompts", "Sample", "Decode and save")
    return wf


WORKFLOWS = {"repcontrolnet_apply.json": repcontrolnet_apply}


def repcontrolnet_train(classes) -> Workflow:
    """Train a RepControlNet on the bundled Canny-edge pairs (which the pack copies to
    ComfyUI/input/magic_portrait_repcontrolnet_dataset/ when ComfyUI starts), plot the loss, then use the result."""
    wf = Workflow(classes)
    wf.note("Train a RepControlNet (Magic Portrait).\n\nRuns as opened: it trains on "
            f"ComfyUI/input/{BUNDLED_DATASET}/, six small image + Canny-edge pairs (crops of scikit-image's sample "
            "photos) that Magic Portrait copies into ComfyUI's input folder when ComfyUI starts (it never "
            "overwrites a file there). To use your own data, make a folder inside ComfyUI/input/ with NAME.png next "
            "to NAME_condition.png (or images/ + conditions/ with matching names) and put its name in "
            "dataset_folder; set resolution to your images' size (512 for SD1.5). Paths outside the input folder "
            "are refused unless the server sets MAGIC_PORTRAIT_ALLOW_ABSOLUTE_DATASET=1.\n\nTraining keeps the base "
            "model frozen, saves models/magic_repcontrolnet/<name>.safetensors with checkpoints every N steps "
            "(resumable), and plots the loss. The trained file is applied right away to sample a picture from the "
            "astronaut's edges.")
    ckpt = wf.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    prompt = wf.encode_text(ckpt.out("CLIP"), "a portrait photo of a person", "Training prompt")
    wf.column = 1
    train = wf.node("MagicPortrait_TrainRepControlNet", dataset_folder=BUNDLED_DATASET, name=TRAINED_NAME, steps=1000,
                    resolution=BUNDLED_SIZE, condition_type="canny", checkpoint_every=100)
    wf.connect(ckpt.out("MODEL"), train, "model")
    wf.connect(ckpt.out("VAE"), train, "vae")
    wf.connect(prompt.out(0), train, "positive")
    wf.column = 2
    loss = wf.node("LossGraphNode", filename_prefix="magic_portrait/repcontrolnet_loss")
    wf.connect(train.out(1), loss, "loss")
    cond = wf.node("LoadImage", image=CONDITION_IMAGE, title="Condition image (Canny edges)")
    apply = wf.node("MagicPortrait_ApplyRepControlNet", strength=1.0, merge_weights=True)
    wf.connect(ckpt.out("MODEL"), apply, "model")
    wf.connect(train.out(0), apply, "repcontrolnet")
    wf.connect(cond.out("IMAGE"), apply, "image")
    wf.column = 3
    sampler = _sample_512(wf, apply, prompt, prompt)
    wf.column = 4
    wf.decode_and_save(sampler.out(0), ckpt.out("VAE"), "magic_portrait/repcontrolnet_trained")
    wf.group_columns("Model and prompt", "Train", "Loss and use the result", "Sample", "Decode and save")
    return wf


WORKFLOWS["repcontrolnet_train.json"] = repcontrolnet_train
