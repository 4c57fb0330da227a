"""ComfyUI nodes of Magic Portrait: thin wrappers that parse inputs, call magic_core and patch model clones."""

from . import diir, faces, inversion, landmark_control, magicid, magicid_dataset, magicstyle, repcontrolnet

NODE_LIST = [*inversion.NODES, *magicstyle.NODES, *repcontrolnet.NODES, *faces.NODES, *landmark_control.NODES,
             *magicid.NODES, *diir.NODES,
             *magicid_dataset.NODES]
