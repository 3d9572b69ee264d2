"""LoRA weights: injecting them (peft), files (save/load/hash), metadata, merging, block weights, prompt tags."""
