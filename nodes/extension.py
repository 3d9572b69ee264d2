"""The ComfyUI extension: the node list, and the pack's HTTP routes for its frontend."""

from comfy_api.latest import ComfyExtension, io


class LoraWorkbenchExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # Node modules are imported here, lazily, so a failure names the module that broke.
        from . import caption_nodes, dataset_nodes, grid_nodes, lora_nodes, merge_nodes, stack_nodes, train_nodes
        from . import web_routes

        # ComfyUI 0.3.x asks for the node list once per load and never calls on_load: routes go here.
        web_routes.register()
        return [*dataset_nodes.NODES, *lora_nodes.NODES, *train_nodes.NODES, *stack_nodes.NODES, *grid_nodes.NODES,
                *merge_nodes.NODES, *caption_nodes.NODES]
