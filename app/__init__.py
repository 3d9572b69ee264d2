"""What runs the engine or ComfyUI from outside: the command line (``cli``), the demo, training a
folder with progress bars (``folder_training``) and the headless workflow runner (``workflow``: UI to API
format; ``workflow_runner``; ComfyUI booted in this process, ``headless``, or reached over HTTP,
``comfy_client``)."""
