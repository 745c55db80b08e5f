"""Hostile and broken inputs give typed errors that name the file, never a crash or a hang."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lineage.errors import CheckpointError, HeaderError, ShardError, UnsupportedFormatError
from lineage.io import open_checkpoint


def _raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def _entry(dtype: str, shape: list[int], start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def test_valid_file_roundtrip(tmp_path: Path) -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    save_file({"w": t, "v": torch.ones(5, dtype=torch.bfloat16)}, tmp_path / "m.safetensors")
    ck = open_checkpoint(tmp_path / "m.safetensors")
    assert torch.equal(ck.read("w"), t)
    assert torch.equal(ck.read("w", 1, 3), t[1:3])
    assert ck.read("v").dtype == torch.float32
    assert ck.tensors["v"].dtype == "BF16"


@pytest.mark.parametrize(
    "name, build, err, words",
    [
        ("missing", None, CheckpointError, "no such file"),
        ("tiny", lambda p: p.write_bytes(b"\x01\x02"), HeaderError, "too short"),
        ("huge_len", lambda p: _raw(p, {}, length=2**40), HeaderError, "cap"),
        ("past_end", lambda p: _raw(p, {}, length=5000), HeaderError, "past the end"),
        ("bad_json", lambda p: _raw(p, b"{not json"), HeaderError, "not valid JSON"),
        ("not_object", lambda p: _raw(p, [1, 2]), HeaderError, "JSON object"),
        ("bad_utf8", lambda p: _raw(p, b'{"\xff": 1}'), HeaderError, "UTF-8"),
        ("unknown_dtype", lambda p: _raw(p, {"w": _entry("Q7", [1], 0, 1)}, b"\0"), UnsupportedFormatError, "unknown dtype"),
        ("bad_shape", lambda p: _raw(p, {"w": _entry("F32", [-1], 0, 4)}, b"\0" * 4), HeaderError, "invalid shape"),
        ("size_mismatch", lambda p: _raw(p, {"w": _entry("F32", [2], 0, 4)}, b"\0" * 8), HeaderError, "needs 8"),
        ("out_of_bounds", lambda p: _raw(p, {"w": _entry("F32", [4], 0, 16)}, b"\0" * 8), HeaderError, "truncated"),
        ("overlap", lambda p: _raw(p, {"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, b"\0" * 12), HeaderError, "overlap"),
        ("duplicate", lambda p: _raw(p, b'{"a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]}, "a": {"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8), HeaderError, "duplicate"),
        ("reversed", lambda p: _raw(p, {"w": _entry("F32", [0], 8, 4)}, b"\0" * 8), HeaderError, "reversed"),
        ("bad_metadata", lambda p: _raw(p, {"__metadata__": {"k": 1}}), HeaderError, "__metadata__"),
        ("deep_json", lambda p: _raw(p, b"[" * 100000 + b"]" * 100000), HeaderError, "JSON"),
    ],
)
def test_hostile_safetensors(tmp_path: Path, name: str, build, err: type, words: str) -> None:
    p = tmp_path / f"{name}.safetensors"
    if build is not None:
        build(p)
    with pytest.raises(err) as info:
        open_checkpoint(p)
    msg = str(info.value)
    assert str(p) in msg
    assert words in msg


def test_truncated_real_file(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(64, 64)}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(HeaderError, match="truncated"):
        open_checkpoint(p)


def test_empty_folder_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no model weights"):
        open_checkpoint(tmp_path)
    (tmp_path / "x.onnx").write_bytes(b"123")
    with pytest.raises(UnsupportedFormatError, match="unrecognised"):
        open_checkpoint(tmp_path / "x.onnx")


def _sharded(tmp_path: Path) -> Path:
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({"a": torch.randn(4, 4)}, d / "model-00001-of-00002.safetensors")
    save_file({"b": torch.randn(4, 4)}, d / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def test_sharded_folder(tmp_path: Path) -> None:
    ck = open_checkpoint(_sharded(tmp_path))
    assert set(ck.tensors) == {"a", "b"}
    assert ck.read("b").shape == (4, 4)


def test_missing_shard(tmp_path: Path) -> None:
    d = _sharded(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ShardError, match="missing shard") as info:
        open_checkpoint(d)
    assert "model.safetensors.index.json" in str(info.value)


def test_index_lists_absent_tensor(tmp_path: Path) -> None:
    d = _sharded(tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["c"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match="absent"):
        open_checkpoint(d)


def test_index_escaping_folder(tmp_path: Path) -> None:
    d = _sharded(tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../evil.safetensors"}}))
    with pytest.raises(ShardError, match="outside"):
        open_checkpoint(d)
