"""Dataset behaviour a user checks: buckets, crops, EXIF, alpha, errors, repeats, captions, sampler."""

from __future__ import annotations

import dataclasses
import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_workbench.training.config import DatasetConfig, DatasetError
from lora_workbench.training.data.buckets import (BucketBatchSampler, assign_bucket, fit_to_bucket, load_pixels,
                                                  make_buckets)
from lora_workbench.training.data.captions import build_caption, tag_frequency
from lora_workbench.training.data.dataset import (ImageDataset, dataset_fingerprint, dataset_summary,
                                                  records_from_images, scan_folder)
from lora_workbench.training.data.images import ImageRecord


def save_image(path: Path, size=(512, 512), color=(120, 60, 30), mode="RGB", caption=None, **save_kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save_kw)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def noise_png_bytes(size=(300, 300), fmt="PNG") -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def fake_record(name, bucket, repeats=1):
    return ImageRecord(f"/x/{name}.png", "", repeats, bucket[0], bucket[1], "c", bucket=bucket)


# ---------------------------------------------------------------- buckets


def test_buckets_are_step_multiples_within_area_and_side_limits():
    buckets = make_buckets(512, 64, 256, 1024)
    assert (512, 512) in buckets
    assert buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w * h <= 512 * 512
        assert (h, w) in buckets
    # for each width the tallest fitting height is there (no wasted area)
    for w in range(256, 1025, 64):
        tallest = min(1024, 512 * 512 // w // 64 * 64)
        if tallest >= 256:
            assert (w, tallest) in buckets
    assert (640, 384) in buckets and (704, 320) in buckets and (1024, 256) in buckets


def test_wide_tall_square_images_land_in_matching_buckets(tmp_path):
    save_image(tmp_path / "wide.png", (768, 512))
    save_image(tmp_path / "tall.png", (512, 768))
    save_image(tmp_path / "square.png", (600, 600))
    by_name = {Path(r.path).stem: r.bucket for r in scan_folder(DatasetConfig(str(tmp_path)))}
    assert by_name["wide"][0] > by_name["wide"][1]
    assert by_name["tall"][0] < by_name["tall"][1]
    assert by_name["square"] == (512, 512)
    assert by_name["wide"] == (640, 384) and by_name["tall"] == (384, 640)


def test_buckets_off_makes_every_image_a_square(tmp_path):
    save_image(tmp_path / "wide.png", (768, 512))
    records = scan_folder(DatasetConfig(str(tmp_path), enable_buckets=False))
    assert records[0].bucket == (512, 512)
    pixels, meta = load_pixels(records[0], DatasetConfig(str(tmp_path), enable_buckets=False))
    assert pixels.shape == (3, 512, 512)
    assert meta["crop_top_left"] == (0, 128)  # 768x512 -> crop 256 px of width, centred


def test_assign_bucket_nearest_aspect_in_log_space_ties_to_larger_area():
    buckets = [(512, 512), (256, 256), (640, 384)]
    assert assign_bucket(300, 300, buckets) == (512, 512)
    assert assign_bucket(2000, 1200, buckets) == (640, 384)
    # 4:1 and 1:1 are equally far (in log space) from 2:1; the larger bucket wins the tie
    assert assign_bucket(200, 100, [(256, 64), (256, 256)]) == (256, 256)
    assert assign_bucket(200, 100, [(512, 128), (192, 192)]) == (512, 128)


@pytest.mark.parametrize("size", [(1024, 512), (512, 1024), (700, 500), (333, 999), (1000, 999)])
def test_crop_removes_only_bucket_rounding(size):
    buckets = make_buckets(512, 64, 256, 1024)
    bucket = assign_bucket(*size, buckets)
    image = Image.new("RGB", size)
    out, (left, top), original = fit_to_bucket(image, bucket)
    assert out.size == bucket and original == size
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    lost_w = round(size[0] * scale) - bucket[0]
    lost_h = round(size[1] * scale) - bucket[1]
    assert min(lost_w, lost_h) == 0  # the image covers the bucket exactly on one side
    assert 0 <= max(lost_w, lost_h) < 64  # and only rounding is lost on the other
    assert (left, top) == (lost_w // 2, lost_h // 2)


def test_batches_never_mix_buckets_and_cover_repeats(tmp_path):
    sizes = [(768, 512)] * 5 + [(512, 768)] * 3 + [(600, 600)] * 4
    for i, size in enumerate(sizes):
        save_image(tmp_path / ("3_many" if i % 2 else "") / f"img{i}.png", size)
    records = scan_folder(DatasetConfig(str(tmp_path)))
    dataset = ImageDataset(records, DatasetConfig(str(tmp_path)))
    sampler = BucketBatchSampler(dataset.records, batch_size=2, seed=7)
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(dataset)))
        for batch in batches:
            assert len({records[dataset.record_index(i)].bucket for i in batch}) == 1
        orders.append(flat)
    assert len({tuple(o) for o in orders}) > 1  # epochs are reshuffled
    sampler.set_epoch(2)
    assert [i for b in sampler for i in b] == orders[2]  # deterministic for (seed, epoch)


def test_sampler_shards_two_ranks_disjoint_and_complete():
    records = [fake_record(f"a{i}", (512, 512), repeats=2) for i in range(6)]
    records += [fake_record(f"b{i}", (640, 384)) for i in range(4)]  # 16 indices -> 8 batches of 2
    ranks = [BucketBatchSampler(records, 2, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for s in ranks:
        s.set_epoch(5)
    shards = [list(s) for s in ranks]
    assert len(shards[0]) == len(shards[1]) == len(ranks[0]) == 4
    seen = [set(i for b in shard for i in b) for shard in shards]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(16))


def test_sampler_uneven_shards_pad_to_same_length():
    records = [fake_record(f"a{i}", (512, 512)) for i in range(5)]  # 5 batches of 1 over 2 ranks
    shards = [list(BucketBatchSampler(records, 1, 0, num_replicas=2, rank=r)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    assert {i for s in shards for b in s for i in b} == set(range(5))


def test_sampler_rejects_impossible_batching():
    records = [fake_record("a", (512, 512))]
    with pytest.raises(DatasetError, match="drop_last"):
        BucketBatchSampler(records, 4, 0, drop_last=True)


# ---------------------------------------------------------------- pixels


def test_exif_rotated_image_comes_out_rotated(tmp_path):
    # stored 600x400: top half red, bottom half blue; orientation 6 = display rotated 90deg clockwise
    stored = Image.new("RGB", (600, 400), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 200, 600, 400))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    (record,) = scan_folder(DatasetConfig(str(tmp_path)))
    assert (record.width, record.height) == (400, 600)
    pixels, meta = load_pixels(record, DatasetConfig(str(tmp_path)))
    assert record.bucket[1] > record.bucket[0]
    assert pixels.shape == (3, record.bucket[1], record.bucket[0])
    assert meta["original_size"] == (600, 400)
    # after rotating clockwise the red top is on the right, blue on the left
    assert pixels[0, :, -5:].mean() > 0.8 and pixels[2, :, -5:].mean() < -0.8
    assert pixels[2, :, :5].mean() > 0.8 and pixels[0, :, :5].mean() < -0.8


def test_transparent_pixels_become_white(tmp_path):
    rgba = Image.new("RGBA", (512, 512), (255, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (0, 0, 256, 512))  # left half opaque black, right half transparent red
    rgba.save(tmp_path / "rgba.png")
    pal = Image.new("P", (512, 512), 1)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(0, (0, 0, 256, 512))  # left red, right index 1 = transparent green
    pal.save(tmp_path / "pal.png", transparency=1)
    cfg = DatasetConfig(str(tmp_path))
    px = {Path(r.path).stem: load_pixels(r, cfg)[0] for r in scan_folder(cfg)}
    assert torch.allclose(px["rgba"][:, :, 300:], torch.ones(3, 512, 212), atol=1e-6)
    assert torch.allclose(px["rgba"][:, :, :200], -torch.ones(3, 512, 200), atol=1e-6)
    assert torch.allclose(px["pal"][:, :, 300:], torch.ones(3, 512, 212), atol=1e-6)
    assert px["pal"][0, :, :200].min() > 0.99 and px["pal"][1, :, :200].max() < -0.99


@pytest.mark.parametrize("mode,color", [("L", 128), ("CMYK", (0, 0, 0, 0)), ("LA", (0, 0))])
def test_other_modes_become_rgb(tmp_path, mode, color):
    save_image(tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"), (512, 512), color, mode=mode)
    cfg = DatasetConfig(str(tmp_path))
    pixels, _ = load_pixels(scan_folder(cfg)[0], cfg)
    assert pixels.shape == (3, 512, 512) and pixels.dtype == torch.float32
    expected = {"L": 128 / 127.5 - 1, "CMYK": 1.0, "LA": 1.0}[mode]  # LA alpha 0 -> white
    assert abs(pixels.mean().item() - expected) < 0.02


def test_flip_mirrors_pixels(tmp_path):
    image = Image.new("RGB", (512, 512), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 100, 512))
    image.save(tmp_path / "a.png")
    cfg = DatasetConfig(str(tmp_path))
    (record,) = scan_folder(cfg)
    plain, _ = load_pixels(record, cfg)
    flipped, _ = load_pixels(record, cfg, flip=True)
    assert plain[:, :, :50].mean() > 0.9 and flipped[:, :, -50:].mean() > 0.9
    assert torch.equal(flipped, plain.flip(-1))


# ---------------------------------------------------------------- errors


def test_missing_folder_and_file_path(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(DatasetConfig(str(tmp_path / "nope")))
    save_image(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="not a folder"):
        scan_folder(DatasetConfig(str(tmp_path / "a.png")))


def test_empty_folder_names_extensions(tmp_path):
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(DatasetError) as e:
        scan_folder(DatasetConfig(str(tmp_path)))
    assert "0 images" in str(e.value) and ".png" in str(e.value) and str(tmp_path) in str(e.value)


@pytest.mark.parametrize("fmt,name", [("PNG", "half.png"), ("JPEG", "half.jpg")])
def test_truncated_image_is_named(tmp_path, fmt, name):
    save_image(tmp_path / "good.png")
    data = noise_png_bytes(fmt=fmt)
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as e:
        scan_folder(DatasetConfig(str(tmp_path)))
    assert name in str(e.value) and "cannot be read" in str(e.value)
    assert "good.png" not in str(e.value)


def test_too_small_image_names_size_and_smallest_bucket(tmp_path):
    save_image(tmp_path / "ok.png", (512, 512))
    save_image(tmp_path / "thumb.png", (200, 900))
    with pytest.raises(DatasetError) as e:
        scan_folder(DatasetConfig(str(tmp_path)))
    msg = str(e.value)
    assert "thumb.png (200x900)" in msg and "256" in msg and "min_bucket_side" in msg
    assert len(scan_folder(DatasetConfig(str(tmp_path), min_bucket_side=192))) == 2  # the fix works


def test_orphan_caption_file_is_named(tmp_path):
    save_image(tmp_path / "a.png", caption="a dog")
    (tmp_path / "b.caption").write_text("lonely")
    with pytest.raises(DatasetError, match=r"b\.caption"):
        scan_folder(DatasetConfig(str(tmp_path)))


def test_several_problems_reported_together(tmp_path):
    save_image(tmp_path / "small.png", (64, 64))
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    (tmp_path / "ghost.txt").write_text("no image")
    for i in range(13):
        save_image(tmp_path / "1_c" / f"tiny{i:02d}.png", (32, 32))
    with pytest.raises(DatasetError) as e:
        scan_folder(DatasetConfig(str(tmp_path)))
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "small.png" in msg and "broken.png" in msg and "ghost.txt" in msg
    assert "and 4 more" in msg  # 14 small images: 10 listed


def test_config_validation_names_field_value_and_range():
    with pytest.raises(DatasetError) as e:
        DatasetConfig("x", repeats=0, caption_dropout=1.5, resolution=500)
    msg = str(e.value)
    assert "repeats=0" in msg and "caption_dropout=1.5" in msg and "resolution=500" in msg
    assert "multiple of bucket_step=64" in msg
    with pytest.raises(DatasetError, match="min_bucket_side"):
        DatasetConfig("x", min_bucket_side=1024, max_bucket_side=512)
    with pytest.raises(DatasetError, match="resolution=2048"):
        DatasetConfig("x", resolution=2048)


# ---------------------------------------------------------------- folders, repeats, captions


def test_concept_folders_give_repeats_and_length_counts_them(tmp_path):
    save_image(tmp_path / "10_sks dog" / "a.png", caption="sks dog, grass")
    save_image(tmp_path / "10_sks dog" / "b.png")
    save_image(tmp_path / "plain" / "c.png")
    save_image(tmp_path / "d.png")
    cfg = DatasetConfig(str(tmp_path), repeats=2, default_caption="a photo")
    records = scan_folder(cfg)
    by_name = {Path(r.path).name: r for r in records}
    assert by_name["a.png"].repeats == 10 and by_name["a.png"].concept == "10_sks dog"
    assert by_name["b.png"].repeats == 10 and by_name["b.png"].caption == "a photo"
    assert by_name["c.png"].repeats == 2 and by_name["d.png"].repeats == 2
    assert by_name["d.png"].concept == tmp_path.name
    assert len(ImageDataset(records, cfg)) == 10 + 10 + 2 + 2
    summary = dataset_summary(records)
    assert summary["num_images"] == 4 and summary["num_images_with_repeats"] == 24
    assert summary["buckets"] == {"512x512": 4}
    assert summary["concepts"]["10_sks dog"] == {"n_repeats": 10, "img_count": 2}


def test_caption_sidecar_order_and_tag_frequency(tmp_path):
    save_image(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("from caption")
    (tmp_path / "a.txt").write_text("  dog, grass, dog  \n")
    save_image(tmp_path / "b.png", caption="dog, sky")
    records = scan_folder(DatasetConfig(str(tmp_path)))
    assert records[0].caption == "dog, grass, dog"  # .txt comes first in caption_extensions
    records2 = scan_folder(DatasetConfig(str(tmp_path), caption_extensions=(".caption", ".txt")))
    assert records2[0].caption == "from caption"
    freq = tag_frequency([dataclasses.replace(r, repeats=5) for r in records])
    assert freq == {tmp_path.name: {"dog": 2, "grass": 1, "sky": 1}}


def test_dataset_get_returns_pixels_caption_meta(tmp_path):
    save_image(tmp_path / "2_x" / "a.png", (768, 512), caption="red, car")
    cfg = DatasetConfig(str(tmp_path), trigger="zxq")
    dataset = ImageDataset(scan_folder(cfg), cfg)
    item = dataset.get(1, epoch_seed=0)
    assert item["record_index"] == 0 and item["caption"] == "zxq, red, car"
    assert item["pixels"].shape == (3, 384, 640)
    assert item["meta"]["target_size"] == (384, 640) and item["meta"]["original_size"] == (512, 768)
    with pytest.raises(IndexError):
        dataset.get(2, 0)


def caption(raw, rng_seed=0, **cfg):
    return build_caption(raw, DatasetConfig("x", **cfg), random.Random(rng_seed))


def test_trigger_placement():
    assert caption("a photo of [trigger] on grass", trigger="sks") == "a photo of sks on grass"
    assert caption("[trigger], dog, [trigger] style", trigger="sks") == "sks, dog, sks style"
    assert caption("dog, grass", trigger="sks") == "sks, dog, grass"
    assert caption("", trigger="sks") == "sks"
    assert caption("sks, dog", trigger="sks") == "sks, dog"
    assert caption("SKS dog, grass", trigger="sks") == "SKS dog, grass"
    assert caption("sksx, dog", trigger="sks") == "sks, sksx, dog"
    assert caption("[trigger], dog", trigger="") == "dog"
    assert caption("dog", trigger="") == "dog"


def test_keep_tokens_and_trigger_stay_in_front():
    tags = [f"t{i}" for i in range(12)]
    raw = ", ".join(tags)
    for seed in range(20):
        out = caption(raw, seed, shuffle_tags=True, keep_tokens=2).split(", ")
        assert out[:2] == ["t0", "t1"] and sorted(out) == sorted(tags)
        out = caption(raw, seed, shuffle_tags=True, keep_tokens=1, trigger="sks").split(", ")
        assert out[:2] == ["sks", "t0"] and sorted(out[1:]) == sorted(tags)


def test_shuffle_is_deterministic_per_seed_and_shuffles():
    raw = ", ".join(f"t{i}" for i in range(10))
    runs = [caption(raw, seed, shuffle_tags=True) for seed in range(30)]
    assert runs == [caption(raw, seed, shuffle_tags=True) for seed in range(30)]
    assert len(set(runs)) > 20
    assert len({r.split(", ")[0] for r in runs}) > 3  # not just the tail moves
    assert caption(raw, 5) == raw  # no shuffle without shuffle_tags


def test_caption_dropout_rate():
    rng = random.Random(1234)
    cfg = DatasetConfig("x", trigger="sks", caption_dropout=0.3)
    dropped = sum(build_caption("dog, grass", cfg, rng) == "" for _ in range(4000))
    assert 0.27 < dropped / 4000 < 0.33
    assert caption("dog", 0, trigger="sks", caption_dropout=1.0) == ""
    assert all(caption("dog", s, caption_dropout=0.0) == "dog" for s in range(50))


# ---------------------------------------------------------------- in-memory images and provenance


def test_records_from_comfy_image_batch():
    batch = torch.full((2, 320, 480, 3), 0.5)
    batch[1, :, :, 0] = 1.0
    cfg = DatasetConfig("", trigger="sks")
    records = records_from_images(batch, ["a cat"], cfg)
    assert [(r.width, r.height, r.caption, r.path) for r in records] == [(480, 320, "a cat", None)] * 2
    assert records[0].bucket[0] > records[0].bucket[1]
    pixels, meta = load_pixels(records[1], cfg)
    assert pixels.shape == (3, records[1].bucket[1], records[1].bucket[0])
    assert abs(pixels[0].mean().item() - 1.0) < 0.01 and abs(pixels[1].mean().item()) < 0.01
    assert meta["original_size"] == (320, 480)
    darker = records_from_images(batch * 0.9, ["a cat"], cfg)
    assert dataset_fingerprint(records) != dataset_fingerprint(darker)
    with pytest.raises(DatasetError, match="3 captions for 2 images"):
        records_from_images(batch, ["a", "b", "c"], cfg)
    with pytest.raises(DatasetError, match="outside 0..1"):
        records_from_images(batch * 255, ["a"], cfg)
    with pytest.raises(DatasetError, match=r"\[N, H, W, 3\]"):
        records_from_images(batch.permute(0, 3, 1, 2), ["a"], cfg)


def test_records_from_pil_images_with_captions_per_image():
    images = [Image.new("RGB", (512, 768)), Image.new("RGBA", (600, 600))]
    records = records_from_images(images, ["one", ""], DatasetConfig("", default_caption="fallback"))
    assert [r.caption for r in records] == ["one", "fallback"]
    assert [r.bucket for r in records] == [(384, 640), (512, 512)]


def test_fingerprint_changes_with_caption_or_image(tmp_path):
    save_image(tmp_path / "a.png", caption="dog")
    save_image(tmp_path / "b.png", caption="cat")
    cfg = DatasetConfig(str(tmp_path))
    first = dataset_fingerprint(scan_folder(cfg))
    assert dataset_fingerprint(scan_folder(cfg)) == first
    (tmp_path / "a.txt").write_text("dog, grass")
    second = dataset_fingerprint(scan_folder(cfg))
    assert second != first
    save_image(tmp_path / "b.png", (640, 512))
    assert dataset_fingerprint(scan_folder(cfg)) != second


# ---------------------------------------------------------------- captions and buckets as written


def test_readme_dreambooth_caption_trains_as_written(tmp_path):
    """README: --trigger sks --default-caption "a photo of sks dog" trains on exactly that caption."""
    make_images_plain(tmp_path, n=1, captions=False)
    cfg = DatasetConfig(path=str(tmp_path), trigger="sks", default_caption="a photo of sks dog", resolution=32,
                        bucket_step=16, min_bucket_side=16, max_bucket_side=64)
    record, = scan_folder(cfg)
    assert build_caption(record.caption, cfg, random.Random(0)) == "a photo of sks dog"
    for caption, trained in [("A photo of SKS dog", "A photo of SKS dog"), ("photo, sks", "photo, sks"),
                             ("a photo of sksdog", "sks, a photo of sksdog"), ("dog", "sks, dog")]:
        assert build_caption(caption, cfg, random.Random(0)) == trained, caption


def test_tag_frequency_stores_captions_as_trained():
    from lora_workbench.training.data.captions import tag_frequency

    cfg = DatasetConfig(path="x", trigger="sks", resolution=32, bucket_step=16, min_bucket_side=16,
                        max_bucket_side=64, shuffle_tags=True, caption_dropout=0.5)
    records = [ImageRecord("a.png", "[trigger], dog, outdoors", 1, 32, 32, "c"),
               ImageRecord("b.png", "dog", 1, 32, 32, "c")]
    assert tag_frequency(records, cfg) == {"c": {"sks": 2, "dog": 2, "outdoors": 1}}


def test_files_the_dataset_does_not_use_are_reported_with_the_reason(tmp_path, caplog):
    make_images_plain(tmp_path, n=1)
    for name in ("anim.gif", "scan.tif", "photo.avif", "notes.md"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "img_00.caption").write_text("a second caption")
    (tmp_path / "5_dog").mkdir()
    make_images_plain(tmp_path / "5_dog", n=1)
    (tmp_path / "5_dog" / "deeper").mkdir()
    cfg = DatasetConfig(path=str(tmp_path), resolution=32, bucket_step=16, min_bucket_side=16, max_bucket_side=64)
    with caplog.at_level("WARNING"):
        scan_folder(cfg)
    text = caplog.text
    for expected in ("6 file(s) not used", "anim.gif (GIF is not read", "scan.tif (TIFF is not read",
                     "photo.avif (AVIF is not read", "notes.md (not an image",
                     "img_00.caption (img_00.txt is the caption read)", "5_dog/deeper/ (sub-folders"):
        assert expected in text, (expected, text)


@pytest.mark.parametrize("resolution, expected", [(256, 128), (512, 256), (1024, 256), (64, 32)])
def test_the_bucket_minimum_follows_the_resolution_unless_set(resolution, expected):
    cfg = DatasetConfig(path="x", resolution=resolution, bucket_step=16, max_bucket_side=max(1024, resolution))
    assert cfg.min_bucket_side == expected
    assert len(make_buckets(cfg.resolution, cfg.bucket_step, cfg.min_bucket_side, cfg.max_bucket_side)) > 1
    assert DatasetConfig(path="x", resolution=resolution, bucket_step=16, min_bucket_side=resolution,
                         max_bucket_side=max(1024, resolution)).min_bucket_side == resolution


def make_images_plain(folder: Path, n: int, captions: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (i * 50, 0, 0)).save(folder / f"img_{i:02d}.png")
        if captions:
            (folder / f"img_{i:02d}.txt").write_text("a photo")
