"""ComfyUI V3 nodes: thin adapters over the engine in ``training/``.

This module is imported only from ``comfy_entrypoint`` (inside ComfyUI), so it may import
``comfy_api``; nothing in ``training/`` may.
"""

from comfy_api.latest import ComfyExtension, io


class LoraWorkbenchExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # Node modules are imported here, lazily, so a failure names the module that broke.
        from . import dataset_nodes, grid_nodes, lora_nodes, merge_nodes, stack_nodes, train_nodes

        return [*dataset_nodes.NODES, *lora_nodes.NODES, *train_nodes.NODES, *stack_nodes.NODES, *grid_nodes.NODES,
                *merge_nodes.NODES]
