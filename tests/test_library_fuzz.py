"""Fuzzing: mutated LoRA files (truncation, byte flips, header corruption, NaN injection) never crash or hang the
readers or the catalog with anything but `LoRAFileError`, and never cost the catalog what it already indexed."""
from __future__ import annotations

import json
import math
import os
import signal
import struct
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from library_fixtures import small_kohya_file
from studio.library import LoRAFileError, inspect_file, read_lora, write_lora
from studio.library.catalog import Catalog


def _base_files(folder) -> dict[str, bytes]:
    """Small valid files: kohya LoRA, diffusers (with adapter metadata), LyCORIS LoHa/LoKr and DoRA."""
    small_kohya_file(folder / "kohya.safetensors", seed=0)
    write_lora(read_lora(folder / "kohya.safetensors"), folder / "diffusers.safetensors", format="diffusers")
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    a = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    b = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    c = "lora_unet_down_blocks_0_resnets_0_conv1"
    save_file({
        f"{a}.hada_w1_a": r(32, 2), f"{a}.hada_w1_b": r(2, 128), f"{a}.hada_w2_a": r(32, 2), f"{a}.hada_w2_b": r(2, 128),
        f"{a}.alpha": torch.tensor(1.0), f"{b}.lokr_w1": r(8, 8), f"{b}.lokr_w2_a": r(16, 2), f"{b}.lokr_w2_b": r(2, 16),
        f"{b}.alpha": torch.tensor(2.0), f"{c}.lora_down.weight": r(2, 32, 1, 1), f"{c}.lora_mid.weight": r(2, 2, 3, 3),
        f"{c}.lora_up.weight": r(32, 2, 1, 1), f"{c}.dora_scale": r(32, 1, 1, 1).abs(),
    }, folder / "lycoris.safetensors", metadata={"ss_network_module": "lycoris.kohya"})
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return _base_files(tmp_path_factory.mktemp("bases"))


@st.composite
def mutations(draw, bases: dict[str, bytes]):
    """(base name, mutation, mutated bytes)."""
    name = draw(st.sampled_from(sorted(bases)))
    data = bytearray(bases[name])
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    kind = draw(st.sampled_from(["truncate", "flip", "header_flip", "header_length", "nan", "header_edit"]))
    if kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind in ("flip", "header_flip"):
        high = len(data) - 1 if kind == "flip" else 8 + n - 1
        for pos in draw(st.lists(st.integers(0, high), min_size=1, max_size=8)):
            data[pos] ^= draw(st.integers(1, 255))
    elif kind == "header_length":
        data[:8] = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(max(0, n - 4), n + 4))).to_bytes(8, "little")
    elif kind == "nan":
        key = draw(st.sampled_from(sorted(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")))
        begin, end = header[key]["data_offsets"]
        pos = 8 + n + begin + 4 * draw(st.integers(0, (end - begin) // 4 - 1))
        data[pos : pos + 4] = struct.pack("<f", draw(st.sampled_from([math.nan, math.inf, -math.inf])))
    else:
        key = draw(st.sampled_from(sorted(header)))
        entry = header[key]
        edit = draw(st.sampled_from(["dtype", "shape", "offsets", "rename", "drop", "metadata", "type"]))
        if edit == "dtype" and key != "__metadata__":
            entry["dtype"] = draw(st.sampled_from(["F16", "BF16", "I64", "U8", "BOOL", "F64", "X9", 7]))
        elif edit == "shape" and key != "__metadata__":
            entry["shape"] = draw(st.lists(st.integers(-2, 300), max_size=5))
        elif edit == "offsets" and key != "__metadata__":
            entry["data_offsets"] = draw(st.lists(st.integers(-10, 10**6), min_size=0, max_size=3))
        elif edit == "rename":
            header[draw(st.sampled_from(["lora_unet_x.lora_up.weight", key.replace("down", "up"), key.upper(),
                                         key + ".weight", "unet.conv_in.lora_A.weight", key.replace("lora", "lokr")]))] = header.pop(key)
        elif edit == "drop":
            header.pop(key)
        elif edit == "metadata":
            header["__metadata__"] = draw(st.sampled_from([
                {"lora_adapter_metadata": "{not json"}, {"lora_adapter_metadata": json.dumps({"unet.alpha_pattern": [1], "unet.lora_alpha": "x"})},
                {"lora_adapter_metadata": json.dumps({"unet.alpha_pattern": {"(": 2.0}, "unet.use_rslora": True})},
                {"ss_tag_frequency": "[["}, {"a": 1}, [], "text",
            ]))
        else:
            header[key] = draw(st.sampled_from([None, [], "x", {"dtype": "F32"}, 3]))
        raw = json.dumps(header).encode()
        data = bytearray(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    return name, kind, bytes(data)


class Hang(Exception):
    pass


@contextmanager
def no_hang(seconds: int = 10):
    def alarm(*_):
        raise Hang(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_readers_only_raise_lora_file_errors(bases, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")

    @settings(max_examples=2500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutations(bases))
    def check(case):
        name, kind, data = case
        path = folder / name
        path.write_bytes(data)
        with no_hang():
            for reader in (read_lora, inspect_file):
                try:
                    reader(path)
                except LoRAFileError as e:
                    assert str(path) in str(e) and e.reason and e.fix

    check()


def test_catalog_keeps_what_it_indexed(bases, tmp_path_factory):
    lib = tmp_path_factory.mktemp("lib")
    for name, data in bases.items():
        (lib / name).write_bytes(data)
    catalog = Catalog(tmp_path_factory.mktemp("db") / "catalog.db")
    catalog.scan(lib)
    indexed = {e.name: (e.id, e.tensor_hash, e.status) for e in catalog.all()}
    assert len(indexed) == len(bases)
    victim = lib / "victim.safetensors"
    stamp = [10**18]

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutations(bases))
    def check(case):
        _, _, data = case
        victim.write_bytes(data)
        stamp[0] += 10**9
        os.utime(victim, ns=(stamp[0], stamp[0]))  # always a change, even when the size is the same
        with no_hang():
            report = catalog.scan(lib)
        assert not report.removed
        entries = {e.name: e for e in catalog.all()}
        for name, (id_, tensor_hash, status) in indexed.items():
            entry = entries[name]
            assert (entry.id, entry.tensor_hash) == (id_, tensor_hash) and entry.status == status
        assert ("victim" in entries) != any(e.name == "victim" for e in catalog.quarantined())

    check()
    catalog.close()
