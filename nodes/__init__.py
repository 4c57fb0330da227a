"""ComfyUI nodes of Magic Portrait: thin wrappers that parse inputs, call magic_core and patch model clones."""

from . import inversion, landmark_control, magicid, magicstyle, repcontrolnet

NODE_LIST = [*inversion.NODES, *magicstyle.NODES, *repcontrolnet.NODES, *landmark_control.NODES, *magicid.NODES]
