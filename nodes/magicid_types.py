"""The ComfyUI socket types of MagicID's nodes, shared by the face and identity node modules."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

FaceAnalysisType = io.Custom("MAGIC_FACE_ANALYSIS")  # a face back-end (magic_core.face_backends analyzer)
FacesType = io.Custom("MAGIC_FACES")  # magic_core.faces.FaceDetections
IPAdapterType = io.Custom("MAGIC_IPADAPTER")  # magic_core.ipadapter.IPAdapterFile
IDEmbedsType = io.Custom("MAGIC_ID_EMBEDS")  # nodes.magicid.IDEmbeds
IdentitiesType = io.Custom("MAGIC_IDENTITIES")  # tuple of nodes.magicid.Identity
# OpenPose keypoint JSON as comfyui_controlnet_aux's DWPose / OpenPose preprocessors output it (not ours: unprefixed)
PoseKeypointType = io.Custom("POSE_KEYPOINT")
