"""Glue between the nodes and ComfyUI itself. ``host.py`` names every difference between the ComfyUI
versions the pack supports; nothing else in the pack asks which ComfyUI it runs on."""
