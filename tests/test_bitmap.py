"""BitMap: JSON round-trips, and every malformed map gets its own clear error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mpq_search import bitmap as bitmap_module
from mpq_search.bitmap import (
    DEFAULT_A_BITS,
    DEFAULT_W_BITS,
    FLOAT,
    SCHEMA,
    BitMap,
    LayerBits,
    TimestepGroup,
    parse_bit_list,
)
from mpq_search.errors import BitMapError
from mpq_search.models import ModelIdentity

MODEL = ModelIdentity("mnist-ddpm", "0123456789abcdef")
NAMES = ["conv_in", "down_blocks.0.resnets.0.conv1", "conv_out"]


def _grouped() -> BitMap:
    return BitMap(
        model=MODEL,
        groups=(
            TimestepGroup(0.0, 0.25, {"conv_in": LayerBits(8, 8), "conv_out": LayerBits(4, 6)}),
            TimestepGroup(0.25, 1.0, {"conv_in": LayerBits(2, 4), "conv_out": LayerBits(32, 16)}),
        ),
        meta={"budget": "4.5bits", "cost": {"avg_w_bits": 4.5}},
    )


def _valid() -> dict[str, Any]:
    return BitMap.uniform(MODEL, NAMES, 4, 8).to_dict()


@pytest.mark.parametrize("bitmap", [BitMap.uniform(MODEL, NAMES, 4, 8), _grouped()])
def test_json_round_trip(bitmap: BitMap, tmp_path: Path) -> None:
    path = bitmap.save(tmp_path / "sub" / "map.json")
    loaded = BitMap.load(path)
    assert loaded == bitmap
    assert loaded.meta == bitmap.meta
    assert json.loads(path.read_text())["schema"] == SCHEMA == "mpq-search/bitmap/v1"
    assert BitMap.from_dict(json.loads(json.dumps(bitmap.to_dict()))) == bitmap


def test_access_single_and_grouped() -> None:
    single = BitMap.uniform(MODEL, NAMES, 4, 8)
    assert not single.is_grouped and single.layers["conv_in"] == LayerBits(4, 8)
    assert single.bits("unlisted") == FLOAT and str(single.bits("conv_in")) == "W4A8"
    grouped = _grouped()
    with pytest.raises(BitMapError, match="several timestep groups"):
        _ = grouped.layers
    steps = 20
    plans = [grouped.for_step(i, steps)["conv_in"].w for i in range(steps)]
    assert plans == [8] * 5 + [2] * 15
    assert grouped.bits("conv_out", group=1) == LayerBits(32, 16)


def test_validate_accepts_known_layers_of_the_same_model() -> None:
    BitMap.uniform(MODEL, NAMES, 4, 8).validate([*NAMES, "extra"], MODEL)
    BitMap.from_layers(MODEL, {}).validate(NAMES, MODEL)  # empty = all float


def test_unknown_layer() -> None:
    bitmap = BitMap.from_layers(MODEL, {n: LayerBits(4, 8) for n in ["a", "b", "c", "d", "e"]})
    with pytest.raises(BitMapError, match=r"unknown layers: a, b, c \(and 2 more\)"):
        bitmap.validate(NAMES)


def test_model_mismatch() -> None:
    other = ModelIdentity("mnist-ddpm", "ffffffffffffffff")
    with pytest.raises(BitMapError, match=r"is for model mnist-ddpm \(0123456789abcdef\), not "
                                          r"mnist-ddpm \(ffffffffffffffff\)"):
        BitMap.uniform(MODEL, NAMES, 4, 8).validate(NAMES, other)


@pytest.mark.parametrize("bits", [0, 1, 9, 12, 33, -4, True, 8.0, "8", None])
def test_bits_out_of_range_or_wrong_type(bits: Any) -> None:
    with pytest.raises(BitMapError, match=r"must be one of 2\.\.8, 16 or 32"):
        LayerBits(bits, 8)
    with pytest.raises(BitMapError, match="activation bits must be one of"):
        LayerBits(8, bits)
    data = _valid()
    data["groups"][0]["layers"]["conv_in"]["a"] = bits
    with pytest.raises(BitMapError, match=r"layer 'conv_in': activation bits must be one of"):
        BitMap.from_dict(data)


def _set(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("schema",), "mpq-search/bitmap/v0", "unsupported bit map schema 'mpq-search/bitmap/v0'"),
        (("schema",), _DELETE, "unsupported bit map schema None"),
        (("model",), "mnist-ddpm", "'model' must be an object with 'name' and 'weights_hash'"),
        (("model", "weights_hash"), _DELETE, "'model' must be an object with 'name'"),
        (("groups",), {"start": 0}, "'groups' must be a list"),
        (("groups",), [], "at least one timestep group"),
        (("groups", 0), "all", "each group must be an object with 'start', 'end' and 'layers'"),
        (("groups", 0, "layers"), [], "each group must be an object"),
        (("groups", 0, "start"), "early", "numeric 'start' and 'end'"),
        (("groups", 0, "end"), _DELETE, "numeric 'start' and 'end'"),
        (("groups", 0, "end"), 0.5, "must end at 1.0, they end at 0.5"),
        (("groups", 0, "start"), 0.2, "contiguous, ordered and cover [0, 1)"),
        (("groups", 0, "layers", "conv_in"), [4, 8], "layer 'conv_in': bits must be an object"),
        (("groups", 0, "layers", "conv_in"), {"w": 4}, "layer 'conv_in': bits must be an object"),
        (("groups", 0, "layers", "conv_in"), {"w": 4, "a": 8, "x": 1}, "bits must be an object"),
        (("groups", 0, "layers", "conv_in", "w"), 1, "layer 'conv_in': weight bits must be one"),
    ],
)
def test_malformed_json_errors(path: tuple[Any, ...], value: Any, message: str) -> None:
    with pytest.raises(BitMapError, match=_escape(message)):
        BitMap.from_dict(_set(_valid(), path, value))


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_top_level_not_an_object() -> None:
    with pytest.raises(BitMapError, match="must be an object"):
        BitMap.from_dict([1, 2])


def test_groups_out_of_order_or_empty() -> None:
    data = _grouped().to_dict()
    data["groups"].reverse()
    with pytest.raises(BitMapError, match="contiguous, ordered"):
        BitMap.from_dict(data)
    data = _grouped().to_dict()
    data["groups"][1]["start"] = data["groups"][1]["end"] = 0.25
    with pytest.raises(BitMapError, match="contiguous, ordered"):
        BitMap.from_dict(data)


def test_files_that_are_missing_or_not_json(tmp_path: Path) -> None:
    with pytest.raises(BitMapError, match="cannot read bit map"):
        BitMap.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{'single': quotes}")
    with pytest.raises(BitMapError, match="is not valid JSON"):
        BitMap.load(bad)


# --- one parser per notation, one home per default -------------------------------------------
@pytest.mark.parametrize(
    ("text", "bits"),
    [("W4A8", LayerBits(4, 8)), ("w4a8", LayerBits(4, 8)), ("  W2 A4 ", LayerBits(2, 4)),
     ("W16A32", LayerBits(16, 32)), ("w8A8\n", LayerBits(8, 8))],
)
def test_layer_bits_parse(text: str, bits: LayerBits) -> None:
    assert LayerBits.parse(text) == bits


@pytest.mark.parametrize(
    ("text", "message"),
    [("4bit", "looks like W4A8, got '4bit'"), ("W4", "looks like W4A8"), ("", "looks like"),
     ("W4A8x", "looks like W4A8"), ("W9A8", "weight bits must be one of 2..8, 16 or 32, got 9"),
     ("W4A1", "activation bits must be one of")],
)
def test_layer_bits_parse_refuses(text: str, message: str) -> None:
    with pytest.raises(BitMapError, match=message):
        LayerBits.parse(text)


def test_parse_setting_is_an_alias_of_layer_bits_parse() -> None:
    from mpq_search.quant import parse_setting

    assert parse_setting(" w3a5 ") == LayerBits.parse("W3A5") == LayerBits(3, 5)
    with pytest.raises(BitMapError, match="looks like W4A8"):
        parse_setting("4bit")


@pytest.mark.parametrize(
    ("text", "bits"),
    [("2,3,4", (2, 3, 4)), ("8, 4,4,2", (2, 4, 8)), ("5", (5,)), ("2,3,", (2, 3))],
)
def test_parse_bit_list(text: str, bits: tuple[int, ...]) -> None:
    assert parse_bit_list(text, "--w-bits") == bits


@pytest.mark.parametrize(
    ("text", "message"),
    [("2,x", "--a-bits must be comma-separated integers, got '2,x'"),
     ("", "--a-bits must list bit-widths between 2 and 8, got ''"),
     ("4,9", "--a-bits must list bit-widths between 2 and 8"), ("1", "between 2 and 8"),
     ("16", "between 2 and 8")],
)
def test_parse_bit_list_refuses(text: str, message: str) -> None:
    with pytest.raises(BitMapError, match=message):
        parse_bit_list(text, "--a-bits")


def test_defaults_and_model_identity_have_one_home() -> None:
    from mpq_search import allocation as allocate
    from mpq_search import models
    from mpq_search.quant import QuantConfig

    assert DEFAULT_W_BITS == (2, 3, 4, 5, 6, 7, 8) and DEFAULT_A_BITS == (4, 5, 6, 7, 8)
    assert allocate.DEFAULT_W_BITS is DEFAULT_W_BITS
    assert allocate.DEFAULT_A_BITS is DEFAULT_A_BITS
    config = QuantConfig()
    assert config.w_bits is DEFAULT_W_BITS and config.a_bits is DEFAULT_A_BITS
    assert models.ModelIdentity is bitmap_module.ModelIdentity is ModelIdentity
