"""Spill cache: a remote span is fetched once; later passes read it from local disk."""

from __future__ import annotations

import random

import pytest

from lineage.io.spill import SpilledSource


class FakeRemote:
    """In-memory source that counts what it serves (like HttpRangeSource's bytes_read)."""

    def __init__(self, data: bytes) -> None:
        self.name = "fake://x"
        self.data = data
        self.bytes_read = 0
        self.calls: list[tuple[int, int]] = []
        self.requests = 0
        self.closed = False

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buffer: memoryview) -> None:
        n = buffer.nbytes
        buffer[:] = self.data[offset:offset + n]
        self.bytes_read += n
        self.requests += 1
        self.calls.append((offset, n))

    def close(self) -> None:
        self.closed = True


DATA = bytes(random.Random(0).getrandbits(8) for _ in range(1 << 16))


def test_reread_is_served_from_disk() -> None:
    src = SpilledSource(FakeRemote(DATA))
    assert src.read(100, 1000) == DATA[100:1100]
    assert src.read(100, 1000) == DATA[100:1100]
    assert src.bytes_read == 1000 and src.inner.calls == [(100, 1000)] and src.local_bytes == 1000
    assert src.requests == 1  # attributes of the remote pass through


def test_only_missing_gaps_are_fetched() -> None:
    src = SpilledSource(FakeRemote(DATA))
    src.read(1000, 100)
    src.read(2000, 100)
    assert src.read(900, 1300) == DATA[900:2200]
    assert src.inner.calls[2:] == [(900, 100), (1100, 900), (2100, 100)]
    assert src.bytes_read == 1300
    assert src._starts == [900] and src._ends == [2200]  # merged into one interval


def test_random_reads_match_the_source() -> None:
    src = SpilledSource(FakeRemote(DATA))
    rng = random.Random(1)
    for _ in range(300):
        off = rng.randrange(0, len(DATA) - 1)
        n = rng.randrange(0, min(4096, len(DATA) - off))
        assert src.read(off, n) == DATA[off:off + n]
    assert src.bytes_read <= len(DATA)


def test_cap_and_disk_errors_fall_back_to_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    capped = SpilledSource(FakeRemote(DATA), max_bytes=500)
    capped.read(0, 400)
    assert capped.read(1000, 200) == DATA[1000:1200]  # over the cap: straight from the network
    capped.read(1000, 200)
    assert capped.bytes_read == 800
    broken = SpilledSource(FakeRemote(DATA))

    def full(*_a: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(broken, "_write", full)
    assert broken.read(0, 300) == DATA[:300] and broken._disabled
    assert broken.read(0, 300) == DATA[:300]
    broken.close()
    assert broken.inner.closed


def test_remote_canonical_compare_fetches_each_byte_once(tmp_path, monkeypatch) -> None:
    import torch

    from lineage.compare import compare
    from lineage.testing.hubserver import HubServer
    from lineage.testing.models import TinyConfig, init_weights, save_model

    cfg = TinyConfig(family="llama", vocab=256, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=128)
    w = init_weights(cfg, seed=3)
    gen = torch.Generator().manual_seed(4)
    child = {k: v + 0.2 * v.std() * torch.randn(v.shape, generator=gen) if v.ndim == 2 else v for k, v in w.items()}
    save_model(tmp_path / "repo" / "org" / "a", cfg, w)
    save_model(tmp_path / "repo" / "org" / "b", cfg, child)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with HubServer(tmp_path / "repo") as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        r = compare("org/a", "org/b")
        sent = srv.bytes_sent
    assert r.verdict.derived is True and r.canon is not None and r.anatomy is not None
    # three passes (statistics, canonical test, anatomy), yet every tensor byte crosses the network once
    assert r.b.bytes_read <= 1.02 * r.b.total_bytes + 65536
    assert sent <= 1.02 * (r.a.total_bytes + r.b.total_bytes) + 200_000
