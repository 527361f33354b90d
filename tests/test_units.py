"""Sizes and rates as operators type them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quelay.units import (
    UnitError,
    format_duration,
    format_rate,
    format_size,
    parse_rate,
    parse_size,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512", 512),
        (512, 512),
        ("0", 0),
        ("512B", 512),
        ("64KiB", 64 * 1024),
        ("1MiB", 1 << 20),
        ("1GiB", 1 << 30),
        ("1.5MiB", 3 << 19),
        ("10MB", 10_000_000),
        ("1k", 1000),
        ("1K", 1000),
        ("1kb", 1000),
        ("2G", 2 * 10**9),
        ("1TiB", 1 << 40),
        ("1 MiB", 1 << 20),
        (" 4 kib ", 4096),
        (".5KiB", 512),
        ("1.", 1),
        ("0.5", 1),  # rounded half up to the nearest byte
        ("1.4", 1),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "-1", -1, "MiB", "1.5.5MiB", "1 XB", "1e6", "ten", "1MiBs", "1 M iB", True, "nan"]
)
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(UnitError) as info:
        parse_size(text)
    assert isinstance(info.value, ValueError)


def test_parse_size_error_names_the_value() -> None:
    with pytest.raises(UnitError, match="'12 parsecs'"):
        parse_size("12 parsecs")


@given(st.integers(min_value=0, max_value=10**30))
def test_parse_size_round_trips_plain_numbers(n: int) -> None:
    assert parse_size(str(n)) == n
    assert parse_size(n) == n


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2Mbps", 2_000_000),
        ("2mbps", 2_000_000),
        ("500kbps", 500_000),
        ("500Kbps", 500_000),
        ("1.5Gbps", 1_500_000_000),
        ("2000000", 2_000_000),
        (2_000_000, 2_000_000),
        ("0", 0),
        (0, 0),
        ("0bps", 0),
        ("uncapped", 0),
        ("2Mbit/s", 2_000_000),
        ("2 Mbit/s", 2_000_000),
        ("100 kbit/s", 100_000),
        ("2M", 2_000_000),
        ("1000", 1000),
        ("1kbps", 1000),
        ("13 Mb/s", 13_000_000),
    ],
)
def test_parse_rate(text: str | int, expected: int) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("10", "rate 10 bit/s is below the minimum 1 kbit/s; did you mean 10Mbps"),
        (10, "below the minimum"),
        ("999bps", "below the minimum"),
        ("0.5kbps", "below the minimum"),
        ("-2Mbps", "'-2Mbps'"),
        (-5, "negative"),
        ("2MB/s", "did you mean 16Mbps"),
        ("2MBps", "in bytes"),
        ("2 Mibit/s", "unknown unit"),
        ("fast", "'fast'"),
        ("", "''"),
        ("2 Mbit/h", "unknown unit"),
    ],
)
def test_parse_rate_rejects(text: str | int, message: str) -> None:
    with pytest.raises(UnitError, match=message.replace("(", r"\(")):
        parse_rate(text)


@pytest.mark.parametrize(
    "n, expected",
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1 << 20, "1.0 MiB"),
        ((1 << 20) - 1, "1.0 MiB"),  # not "1024.0 KiB"
        (5 * (1 << 30), "5.0 GiB"),
        (1 << 50, "1.0 PiB"),
    ],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


@pytest.mark.parametrize(
    "bps, expected",
    [
        (0, "uncapped"),
        (2_000_000, "2.00 Mbit/s"),
        (500_000, "500 kbit/s"),
        (15_300_000, "15.3 Mbit/s"),
        (999_999, "1.00 Mbit/s"),
        (1.5e9, "1.50 Gbit/s"),
        (800, "800 bit/s"),
        (12.5, "12.5 bit/s"),
    ],
)
def test_format_rate(bps: float, expected: str) -> None:
    assert format_rate(bps) == expected


def test_format_rate_measured_zero() -> None:
    assert format_rate(0, zero="0 bit/s") == "0 bit/s"


@given(st.integers(min_value=1000, max_value=10**13))
def test_format_rate_parses_back_closely(bps: int) -> None:
    text = format_rate(bps).replace(" ", "")
    assert abs(parse_rate(text) - bps) <= bps * 0.005


@pytest.mark.parametrize(
    "seconds, expected",
    [
        (0, "0.0s"),
        (3.21, "3.2s"),
        (9.96, "10s"),
        (42.4, "42s"),
        (59.6, "1m00s"),
        (65, "1m05s"),
        (3723, "1h02m03s"),
        (3 * 86400 + 4 * 3600 + 59, "3d04h"),
        (float("inf"), "unknown"),
        (float("nan"), "unknown"),
    ],
)
def test_format_duration(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected
