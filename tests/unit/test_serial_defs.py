"""Serial frame definitions: loading the shipped examples, precise validation errors, the JSON
Schema export, checksum catalogue values and ``decode --defs``."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from daq_agent.core.errors import ConfigError
from daq_agent.serialdefs import (
    ChecksumKind,
    FormatKind,
    FramingKind,
    SerialCodec,
    checksum_function,
    json_schema,
    load_definitions,
    loads_definitions,
    parse_definitions,
)
from daq_agent.serialdefs.cli import decode_stream, serial_flows
from daq_agent.serialdefs.loader import _TOP_KEYS

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "serial"


def test_shipped_examples_load() -> None:
    """The GPS and IMU examples load, with the frame types and channels the docs promise."""
    gps = load_definitions(CONFIGS / "gps_nmea.yaml")
    assert gps.format is FormatKind.NMEA
    assert [f.name for f in gps.frames] == ["gga", "rmc", "vtg"]
    imu = load_definitions(CONFIGS / "imu_cobs.yaml")
    assert imu.framing.kind is FramingKind.COBS
    assert imu.checksum is not None
    assert imu.checksum.kind is ChecksumKind.CRC16_CCITT_FALSE
    imu_frame = imu.frame("imu")
    assert len(imu_frame.fields) + 1 == 12  # eleven fields plus the type discriminator
    codec = SerialCodec(imu, device="imu0")
    assert [f.name for f in codec.flows] == ["imu0.imu", "imu0.status"]
    assert len(codec.flows[0].channels) == 15


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("format: binary\nframes: []\n", ":1: framing: is required for the binary format"),
        (
            "format: csv\nframes:\n  - name: a\n    fields:\n      - {name: x, type: uint12}\n",
            ":5: frames[0].fields[0].type: unknown value 'uint12'",
        ),
        (
            (
                "format: binary\nframing: {kind: cobs}\nframes:\n  - name: a\n    fields:\n"
                "      - {name: x, type: uint8}\n      - {name: x, type: uint8}\n"
            ),
            ":7: frames[0].fields[1]: duplicate channel name 'x'",
        ),
        (
            (
                "format: binary\nframing: {kind: cobs}\nframes:\n"
                "  - {name: a, id: 1, fields: [{name: x, type: uint8}]}\n"
                "  - {name: b, id: 2, fields: [{name: y, type: uint8}]}\n"
            ),
            ":1: discriminator: several frame types need a discriminator",
        ),
        (
            (
                "format: binary\nframing: {kind: cobs}\nchecksum: {kind: crc17}\nframes:\n"
                "  - {name: a, fields: [{name: x, type: uint8}]}\n"
            ),
            ":3: checksum.kind: unknown value 'crc17'",
        ),
        (
            (
                "format: binary\nframing: {kind: fixed, length: 4}\n"
                "checksum: {kind: crc16_modbus}\nframes:\n"
                "  - {name: a, fields: [{name: x, type: uint32}]}\n"
            ),
            "frames[0].fields[0]: overlaps the checksum at byte 2",
        ),
        (
            (
                "format: binary\nframing: {kind: cobs}\nframes:\n  - name: a\n    fields:\n"
                "      - name: s\n        type: uint8\n        bits:\n"
                "          - {name: b, start: 6, length: 3}\n"
            ),
            ":9: frames[0].fields[0].bits[0].length: bits 6..8 exceed the 8-bit field",
        ),
        (
            (
                "format: binary\nframing: {kind: cobs}\nframes:\n  - name: a\n    fields:\n"
                "      - {name: m, type: uint8, scale: 2, values: {0: idle}}\n"
            ),
            ":6: frames[0].fields[0].values: a field with a value table cannot be scaled",
        ),
        (
            (
                "format: regex\nframes:\n  - name: a\n    pattern: 'T=(?P<t>\\d+)'\n"
                "    fields: [{name: temp, type: int}]\n"
            ),
            "frames[0].fields[0].name: the pattern has no group named 'temp'",
        ),
        (
            "format: nmea\nframes:\n  - name: a\n    fields: [{name: t, type: time}]\n",
            ":3: frames[0].id: is required (the sentence id",
        ),
        (
            (
                "format: binary\nframing: {kind: sync_length, sync: 'ZZ', length_field: {at: 2}}\n"
                "frames:\n  - {name: a, fields: [{name: x, type: uint8}]}\n"
            ),
            ":2: framing.sync: not a hex byte string",
        ),
        (
            (
                "format: binary\nframing: {kind: cobs}\ntimestamp: {field: nope}\nframes:\n"
                "  - {name: a, fields: [{name: x, type: uint8}]}\n"
            ),
            ":3: timestamp.field: no frame has a field named 'nope'",
        ),
        (
            (
                "format: csv\nchecksum: {kind: crc8}\nframes:\n"
                "  - {name: a, fields: [{name: x, type: int}]}\n"
            ),
            ":2: checksum: only for the binary format",
        ),
        ("format: csv\nframes: [\n", "invalid YAML"),
        (
            (
                "format: csv\nframes:\n  - name: a\n    fields:\n"
                "      - {name: m, type: int, values: {0: off}}\n"
            ),
            ":5: frames[0].fields[0].values.0: the name must be a string, not False (quote it",
        ),
        (
            "format: csv\nframes:\n  - {name: a, fields: [{name: x, type: int, colour: red}]}\n",
            "frames[0].fields[0].colour: unknown key",
        ),
    ],
)
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    """Each invalid definition raises one ConfigError naming the file, line, key path and reason."""
    path = tmp_path / "device.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_definitions(path)
    rendered = str(info.value)
    assert rendered.startswith(str(path)), rendered
    assert message in rendered, rendered
    assert "\n" not in rendered


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A definition file that does not exist is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_definitions(tmp_path / "nope.yaml")


def test_defaults_fill_positions() -> None:
    """Fields without a position follow the header (sync, length, discriminator) and each other."""
    defs = loads_definitions(
        "format: binary\nbyte_order: big\n"
        "framing: {kind: sync_length, sync: 'AA 55', length_field: {at: 2, type: uint16}}\n"
        "discriminator: {at: 4, type: uint8}\n"
        "frames:\n  - name: a\n    id: 1\n    fields:\n"
        "      - {name: x, type: uint16}\n      - {name: y, type: float32}\n"
        "      - {name: z, type: uint8, at: 20}\n      - {name: w, type: int8}\n"
    )
    fields = defs.frame("a").fields
    assert [(f.at, f.byte_order.value) for f in fields] == [
        (5, "big"),
        (7, "big"),
        (20, "big"),
        (21, "big"),
    ]


def test_json_schema_covers_the_loader() -> None:
    """The JSON Schema is JSON, closed, and knows every top-level key the loader accepts."""
    schema = json_schema()
    json.dumps(schema)
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(_TOP_KEYS)
    fields = schema["properties"]["frames"]["items"]["properties"]["fields"]["items"]
    assert fields == {"$ref": "#/$defs/field"}
    field_types = schema["$defs"]["field"]["properties"]["type"]["enum"]
    assert {"uint64", "int24", "talker", "group"} <= set(field_types)


@pytest.mark.parametrize(
    ("kind", "check"),
    [
        ("crc8", 0xF4),
        ("crc16_ccitt_false", 0x29B1),
        ("crc16_modbus", 0x4B37),
        ("crc16_xmodem", 0x31C3),
        ("crc32", 0xCBF43926),
        ("xor8", 0x31),
        ("sum8", 0xDD),
    ],
)
def test_checksum_catalogue_check_values(kind: str, check: int) -> None:
    """Every checksum gives its catalogue check value over b'123456789'."""
    assert checksum_function(ChecksumKind(kind))(b"123456789") == check


@pytest.mark.parametrize(
    ("parameters", "check"),
    [
        # (poly, init, reflect, xorout) from the CRC RevEng catalogue, and its check value
        ((0x104C11DB7, 0xFFFFFFFF, True, 0xFFFFFFFF), 0xCBF43926),  # CRC-32
        ((0x11EDC6F41, 0xFFFFFFFF, True, 0xFFFFFFFF), 0xE3069283),  # CRC-32C
        ((0x11021, 0xB2AA, True, 0x0000), 0x63D0),  # CRC-16/RIELLO: a reflected, asymmetric init
        ((0x11021, 0xFFFF, True, 0xFFFF), 0x906E),  # CRC-16/IBM-SDLC
        ((0x11021, 0x1D0F, False, 0x0000), 0xE5CC),  # CRC-16/SPI-FUJITSU (AUG-CCITT)
        ((0x131, 0x00, True, 0x00), 0xA1),  # CRC-8/MAXIM-DOW
        ((0x1864CFB, 0xB704CE, False, 0x000000), 0x21CF02),  # CRC-24/OPENPGP
    ],
)
def test_custom_crc_parameters(parameters: tuple[int, int, bool, int], check: int) -> None:
    """``kind: crc`` with catalogue parameters gives the catalogue's check value."""
    poly, init, reflect, xorout = parameters
    defs = loads_definitions(
        "format: binary\nframing: {kind: cobs}\n"
        f"checksum: {{kind: crc, poly: {poly:#x}, init: {init:#x}, reflect: {str(reflect).lower()},"
        f" xorout: {xorout:#x}}}\n"
        "frames: [{name: a, fields: [{name: x, type: uint8}]}]\n"
    )
    assert defs.checksum is not None
    assert defs.checksum.size == (poly.bit_length() - 1) // 8
    assert checksum_function(defs.checksum.kind, defs.checksum)(b"123456789") == check


def test_fletcher8_is_ubx_checksum() -> None:
    """UBX's Fletcher-8 over a known frame (CFG-PRT poll of UART1: B5 62 06 00 01 00 01 08 22)."""
    function = checksum_function(ChecksumKind.FLETCHER8)
    assert function(bytes.fromhex("06 00 01 00 01")) == 0x0822


def test_decode_stream_text_and_json(tmp_path: Path) -> None:
    """decode --defs prints one line per frame (faults included) and a JSON object per frame."""
    defs_path = CONFIGS / "imu_cobs.yaml"
    codec = SerialCodec(load_definitions(defs_path), device="imu")
    capture = (
        codec.encode("imu", {"seq": 7, "mode": 3, "filter_state": 1})
        + b"\x00garbage\x00"
        + codec.encode(
            "status", {"uptime": 9, "firmware": "v1.0", "serial_number": b"\x01\x02\x03\x04"}
        )
    )
    out = io.StringIO()
    assert decode_stream(str(defs_path), io.BytesIO(capture), out, as_json=False) == 1
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("imu: seq=7 ")
    assert "mode=3" in lines[0]
    assert lines[1].startswith("status: uptime=9 ")
    assert "serial_number=01020304" in lines[1]
    assert lines[2] == "! framing: 1 error(s), 7 bytes dropped"  # reported per chunk read
    assert lines[-1].startswith("# 2 frames decoded")
    out = io.StringIO()
    clean = codec.encode("imu", {"seq": 1}) + codec.encode("imu", {"seq": 2})
    assert decode_stream(str(defs_path), io.BytesIO(clean), out, as_json=True) == 0
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["fields"]["seq"] for r in records] == [1, 2]
    assert records[0]["frame"] == "imu"
    assert records[0]["timestamp_ns"] is None


def test_decode_stream_nmea_json(tmp_path: Path) -> None:
    """NMEA captures decode to JSON with empty fields as null and checksum faults reported."""
    capture = (
        b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"
        b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*00\r\n"
    )
    out = io.StringIO()
    code = decode_stream(str(CONFIGS / "gps_nmea.yaml"), io.BytesIO(capture), out, as_json=True)
    assert code == 1
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["flow"] == "gps.gga"
    assert first["fields"]["satellites"] == 8
    assert first["fields"]["dgps_age"] is None
    assert second == {
        "error": "checksum",
        "raw": capture.splitlines()[1].hex(),
        "text": "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*00",
    }


def test_decode_stream_bad_defs_raise(tmp_path: Path) -> None:
    """decode --defs with an invalid definition raises ConfigError (the CLI maps it to exit 2)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: nope\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml:1: format"):
        decode_stream(str(bad), io.BytesIO(b""), io.StringIO(), as_json=False)


_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-5, 300), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(node: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.extend(_paths(value, (*prefix, i)))
    return out


@pytest.mark.parametrize("name", ["imu_cobs.yaml", "gps_nmea.yaml", "ublox_nav_pvt.yaml"])
def test_mutated_definitions_fail_only_with_config_errors(name: str) -> None:
    """Any value anywhere in a definition is either accepted or a ConfigError, never a crash."""
    original = yaml.safe_load((CONFIGS / name).read_text(encoding="utf-8"))
    paths = [p for p in _paths(original) if p]

    @settings(max_examples=150, deadline=None)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        document = copy.deepcopy(original)
        for _ in range(data.draw(st.integers(1, 3))):
            path = data.draw(st.sampled_from(paths))
            node = document
            try:
                for key in path[:-1]:
                    node = node[key]
                node[path[-1]] = data.draw(_JUNK)
            except (KeyError, IndexError, TypeError):
                continue  # an earlier mutation removed that branch
        error: ConfigError | None = None
        try:
            defs = parse_definitions(document, source="mutated.yaml")
        except ConfigError as exc:
            error = exc
        if error is not None:
            assert error.key, str(error)  # every error names the key it is about
            return
        SerialCodec(defs, device="x")  # whatever loads also compiles

    check()


def test_serial_flows_for_the_flows_command() -> None:
    """serial_flows names flows from the device and template, with typed channels."""
    flows = serial_flows(str(CONFIGS / "gps_nmea.yaml"), "rover", "{device}/{frame}")
    assert [f.name for f in flows] == ["rover/gga", "rover/rmc", "rover/vtg"]
    quality = next(c for c in flows[0].channels if c.name == "fix_quality")
    assert [(e.name, e.key) for e in quality.enum_types][:2] == [("invalid", 0), ("gps", 1)]
    assert [f.name for f in serial_flows(str(CONFIGS / "imu_cobs.yaml"))] == [
        "imu.imu",
        "imu.status",
    ]
    with pytest.raises(ConfigError, match="flow_name_template"):
        serial_flows(str(CONFIGS / "imu_cobs.yaml"), "x", "{bus}.{frame}")


def test_public_surface() -> None:
    """daq_agent.serialdefs exports a sorted __all__ (constants, classes, functions: ruff's
    order) whose every name exists."""
    import daq_agent.serialdefs as package

    def order(name: str) -> tuple[bool, bool, str]:
        return (not name.isupper(), not name[0].isupper(), name)

    assert list(package.__all__) == sorted(package.__all__, key=order)
    missing = [name for name in package.__all__ if not hasattr(package, name)]
    assert missing == []
    assert {"SerialCodec", "FrameStream", "load_definitions", "json_schema"} <= set(package.__all__)


@pytest.mark.parametrize("name", ["imu_cobs.yaml", "gps_nmea.yaml", "ublox_nav_pvt.yaml"])
def test_shipped_examples_validate_against_the_schema(name: str) -> None:
    """The exported JSON Schema accepts the shipped examples and rejects an unknown key."""
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema())
    document = yaml.safe_load((CONFIGS / name).read_text(encoding="utf-8"))
    assert list(validator.iter_errors(document)) == []
    document["frames"][0]["fields"][0]["colour"] = "red"
    assert list(validator.iter_errors(document))
