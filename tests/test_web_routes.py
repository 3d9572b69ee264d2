"""The frontend's LoRA info route reads a safetensors header only, through safetensors itself."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from lora_workbench.nodes.web_routes import read_metadata


def test_read_metadata_gives_the_header_metadata(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata={"modelspec.trigger_phrase": "sks", "ss_network_dim": "4"})
    assert read_metadata(str(path)) == {"modelspec.trigger_phrase": "sks", "ss_network_dim": "4"}
    save_file({"x": torch.zeros(2)}, str(tmp_path / "b.safetensors"))
    assert read_metadata(str(tmp_path / "b.safetensors")) == {}
    (tmp_path / "c.ckpt").write_bytes(b"not read")
    assert read_metadata(str(tmp_path / "c.ckpt")) == {}


@pytest.mark.parametrize("blob", [
    b"abc",  # shorter than the header's size field
    struct.pack("<Q", 1 << 40) + b"{}",  # a header claiming a terabyte: refused, never allocated
    struct.pack("<Q", 4) + b"{no",  # not JSON
])
def test_read_metadata_refuses_what_is_not_a_safetensors_file(tmp_path, blob):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match="bad.safetensors"):
        read_metadata(str(path))


def test_read_metadata_does_not_read_the_tensors(tmp_path):
    """The answer comes from the header; the 64 MB data region (a sparse file here) is mapped, not read."""
    path = tmp_path / "big.safetensors"
    header = json.dumps({"__metadata__": {"k": "v"},
                         "w": {"dtype": "F32", "shape": [16 << 20], "data_offsets": [0, 64 << 20]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + (64 << 20))  # sparse: reading it would be the slow part
    assert read_metadata(str(path)) == {"k": "v"}
