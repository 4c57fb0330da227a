"""Magic Portrait: MagicStyle, MagicID and RepControlNet nodes for ComfyUI (V3 extension entry point).

ComfyUI's API is imported inside the entry point so that importing the package outside ComfyUI (tools, tests)
has no side effects. The pack imports the numbered API (comfy_api.v0_0_2), which ComfyUI keeps backward
compatible, not `comfy_api.latest`, which is still under development."""

# The frontend extension: keeps the crops of ID Embeds nodes saved with 0.2 (web/face_margin.js).
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from comfy_api.v0_0_2 import ComfyExtension

    from .nodes import NODE_LIST
    from .nodes.example_inputs import install_example_inputs

    class MagicPortraitExtension(ComfyExtension):
        async def get_node_list(self):
            install_example_inputs()  # so the example workflows run as opened from the templates
            return list(NODE_LIST)

    return MagicPortraitExtension()
