"""The LoRA Workbench engine: datasets, LoRA layers, the training loop and LoRA files.

Host-independent: it runs on torch, diffusers, peft and safetensors and never imports ComfyUI
(a test enforces it). The ComfyUI nodes and the ``lora-workbench`` CLI both drive it.
"""
