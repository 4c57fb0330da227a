"""Every ComfyUI socket type the pack's nodes pass between them, in one place, so schema modules share types without
importing one another."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

# Inversion and MagicStyle
InversionRecordType = io.Custom("MAGIC_INVERSION")  # nodes.sampling.InversionRecord
# A KV store spec (from the KV Feature Store node) says what to capture; DDIM Invert fills a store with it. The spec
# object provides begin(model, samples, sigmas, node) -> (model clone that captures, store) and finish(store, node).
KVStoreSpecType = io.Custom("MAGIC_KV_STORE_SPEC")
KVStoreType = io.Custom("MAGIC_KV_STORE")  # magic_core.kv_store.KVStore

# Faces and MagicID
FaceAnalysisType = io.Custom("MAGIC_FACE_ANALYSIS")  # a face back-end (magic_core.face_backends analyzer)
FacesType = io.Custom("MAGIC_FACES")  # magic_core.faces.FaceDetections
IPAdapterType = io.Custom("MAGIC_IPADAPTER")  # magic_core.ipadapter.IPAdapterFile
IDEmbedsType = io.Custom("MAGIC_ID_EMBEDS")  # nodes.mgmica_patch.IDEmbeds
IdentitiesType = io.Custom("MAGIC_IDENTITIES")  # tuple of nodes.mgmica_patch.Identity
# OpenPose keypoint JSON as comfyui_controlnet_aux's DWPose / OpenPose preprocessors output it (not ours: unprefixed)
PoseKeypointType = io.Custom("POSE_KEYPOINT")

# RepControlNet
RepControlNetType = io.Custom("MAGIC_REPCONTROLNET")  # magic_core.repcontrolnet.RepControlNetWeights
LossMapType = io.Custom("LOSS_MAP")  # the type ComfyUI's LossGraphNode plots (not ours: unprefixed)
