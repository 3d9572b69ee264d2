"""Load Image Dataset and Class Images: folders or IMAGE batches -> engine records, checked early."""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io

from ..training.config import DatasetConfig, DatasetError
from ..training.data.buckets import load_pixels
from ..training.data.dataset import records_from_images, scan_folder
from .comfy.paths import input_folder
from .types import ClassImages, ClassImagesPayload, Dataset, DatasetPayload


def preview_batch(records, cfg: DatasetConfig, n: int = 4) -> torch.Tensor:
    """The first n images as they will be trained (bucketed, cropped), letterboxed to one size."""
    shots = [load_pixels(r, cfg)[0] for r in records[:n]]
    h = max(s.shape[1] for s in shots)
    w = max(s.shape[2] for s in shots)
    out = torch.ones((len(shots), h, w, 3))
    for i, s in enumerate(shots):
        out[i, : s.shape[1], : s.shape[2]] = ((s + 1) / 2).permute(1, 2, 0)
    return out


class LoadImageDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LW_LoadImageDataset",
            display_name="Load Image Dataset (LoRA Workbench)",
            category="LoRA Workbench/dataset",
            description="Reads the pictures to train on: a folder of images with optional .txt captions (kohya "
                        "'10_name' sub-folders repeat their images), or images connected from the graph. "
                        "Problems (unreadable, too small, caption without image) are reported before training.",
            inputs=[
                io.String.Input("folder", default="", tooltip="A folder under ComfyUI's input folder, or an "
                                "absolute path. Ignored when images are connected."),
                io.String.Input("trigger_word", default="", tooltip="Rare word that will mean your subject, e.g. "
                                "'sks'. Replaces [trigger] in captions, or is put in front of them."),
                io.String.Input("default_caption", default="", multiline=True,
                                tooltip="Caption for images without a caption file, e.g. 'a photo of a dog'."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Training resolution: buckets hold about resolution x resolution pixels."),
                io.Boolean.Input("aspect_buckets", default=True, tooltip="Keep each image's aspect ratio by "
                                 "sorting images into buckets; off crops every image to a square."),
                io.Int.Input("bucket_step", default=64, min=8, max=256, step=8,
                             tooltip="Bucket sides are multiples of this (64 for SD)."),
                io.Int.Input("min_bucket_side", default=256, min=64, max=4096, step=64,
                             tooltip="Smallest bucket side; images smaller than this are rejected."),
                io.Int.Input("max_bucket_side", default=1024, min=64, max=8192, step=64,
                             tooltip="Largest bucket side (for very wide or tall images)."),
                io.Int.Input("repeats", default=1, min=1, max=1000, tooltip="How often each image is seen per "
                             "epoch (folders named '10_name' set their own)."),
                io.Boolean.Input("shuffle_tags", default=False, tooltip="Shuffle comma-separated caption tags "
                                 "each time (the trigger and the first 'keep_tokens' tags stay in front)."),
                io.Int.Input("keep_tokens", default=0, min=0, max=100, tooltip="Tags at the start of a caption "
                             "that are never shuffled."),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Chance to train an image with an empty caption."),
                io.Boolean.Input("flip", default=False, tooltip="Randomly mirror images left-right (avoid for "
                                 "asymmetric subjects and text)."),
                io.Image.Input("images", optional=True, tooltip="Images from the graph instead of a folder."),
                io.String.Input("captions", optional=True, multiline=True, default="",
                                tooltip="With connected images: one caption per line (or one line for all)."),
                io.Boolean.Input("masked_loss", default=False, optional=True,
                                 tooltip="Learn only where a mask says: <name>_mask.png beside an image (white = "
                                 "learn, black = ignore, same size as the image), else the image's transparency. "
                                 "Images with neither are learnt everywhere."),
            ],
            outputs=[
                Dataset.Output(display_name="dataset"),
                io.Image.Output(display_name="preview", tooltip="The first images as they will be trained."),
                io.String.Output(display_name="captions", tooltip="The first captions, trigger placed."),
            ],
        )

    @classmethod
    def execute(cls, folder, trigger_word, default_caption, resolution, aspect_buckets, bucket_step,
                min_bucket_side, max_bucket_side, repeats, shuffle_tags, keep_tokens, caption_dropout, flip,
                images=None, captions="", masked_loss=False) -> io.NodeOutput:
        import random

        from ..training.data.captions import build_caption

        source = "images from the graph" if images is not None else input_folder(folder)
        cfg = DatasetConfig(path=source, trigger=trigger_word.strip(), default_caption=default_caption.strip(),
                            resolution=resolution, enable_buckets=aspect_buckets, bucket_step=bucket_step,
                            min_bucket_side=min(min_bucket_side, resolution),
                            max_bucket_side=max(max_bucket_side, resolution), repeats=repeats,
                            shuffle_tags=shuffle_tags, keep_tokens=keep_tokens, caption_dropout=caption_dropout,
                            flip=flip, masked_loss=masked_loss)
        if images is not None:
            lines = [c.strip() for c in (captions or "").splitlines() if c.strip()] or [default_caption.strip()]
            records = records_from_images(images, lines, cfg)
        else:
            records = scan_folder(cfg)
        from ..training.data.buckets import assign_buckets

        records = assign_buckets(records, cfg)
        rng = random.Random(0)
        text = "\n".join(f"{r.name}: {build_caption(r.caption, cfg, rng)}" for r in records[:8])
        if len(records) > 8:
            text += f"\n... {len(records) - 8} more"
        return io.NodeOutput(DatasetPayload(records, cfg, source), preview_batch(records, cfg), text)


class ClassImagesNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LW_ClassImages",
            display_name="Class Images (LoRA Workbench)",
            category="LoRA Workbench/dataset",
            description="The prior-preservation set of DreamBooth: pictures of the general class (e.g. 'a "
                        "photo of a dog'), best rendered by the same checkpoint with a KSampler, so training "
                        "your subject does not change what the class looks like.",
            inputs=[
                io.String.Input("class_prompt", default="a photo of a person",
                                tooltip="The class the subject belongs to, without the trigger word."),
                io.Image.Input("images", optional=True, tooltip="Class images, e.g. from a KSampler + VAE "
                               "Decode with the class prompt on the same checkpoint."),
                io.String.Input("folder", optional=True, default="", tooltip="Or a folder of class images "
                                "(under ComfyUI's input folder, or absolute)."),
            ],
            outputs=[ClassImages.Output(display_name="class_images")],
        )

    @classmethod
    def execute(cls, class_prompt, images=None, folder="") -> io.NodeOutput:
        if not class_prompt.strip():
            raise DatasetError("class_prompt is empty: describe the class, e.g. 'a photo of a dog'")
        if images is None and not (folder or "").strip():
            raise DatasetError("Class Images needs images (connect a VAE Decode of class-prompt samples) or a folder")
        path = input_folder(folder) if images is None else None
        if path is not None and not os.path.isdir(path):
            raise DatasetError(f"class image folder {path} does not exist; check the path")
        return io.NodeOutput(ClassImagesPayload(prompt=class_prompt.strip(), images=images, folder=path))


NODES = [LoadImageDataset, ClassImagesNode]
