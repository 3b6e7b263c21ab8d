import pytest

from wq.scheme import GRAMMAR, QuantScheme, SchemeError


@pytest.mark.parametrize(
    "text,bits,group,sym",
    [
        ("W4G128", 4, 128, True),
        ("W4G-1", 4, -1, True),
        ("W3G128", 3, 128, False),
        ("W2G128", 2, 128, False),
        ("W8G128", 8, 128, True),
        ("W8", 8, -1, True),
        ("W4G32", 4, 32, True),
        ("w4g64-asym", 4, 64, False),
        ("W3G256-sym", 3, 256, True),
        ("W2G32-sym", 2, 32, True),
    ],
)
def test_parse_int_schemes(text, bits, group, sym):
    s = QuantScheme.parse(text)
    assert (s.bits, s.group_size, s.sym, s.fmt) == (bits, group, sym, "int")
    assert QuantScheme.parse(str(s)) == s  # str round-trips


@pytest.mark.parametrize("text,fmt,group", [("BF16", "bf16", -1), ("fp16", "fp16", -1), ("FP8", "e4m3", -1),
                                             ("FP8G128", "e4m3", 128), ("FP8-e5m2", "e5m2", -1)])
def test_parse_float_schemes(text, fmt, group):
    s = QuantScheme.parse(text)
    assert (s.fmt, s.group_size) == (fmt, group)
    assert QuantScheme.parse(str(s)) == s


def test_default_strings_are_canonical():
    assert str(QuantScheme.parse("W8")) == "W8G-1"
    assert str(QuantScheme.parse("W4G128-sym")) == "W4G128"
    assert str(QuantScheme.parse("W3G128-asym")) == "W3G128"
    assert str(QuantScheme.parse("W4G128-asym")) == "W4G128-asym"


@pytest.mark.parametrize("bad", ["W5G128", "W4G100", "W4G0", "X4G128", "W4G128-foo", "", "W16", "FP16G128",
                                 "FP8G7"])
def test_bad_schemes_show_grammar(bad):
    with pytest.raises(SchemeError) as e:
        QuantScheme.parse(bad)
    assert GRAMMAR in str(e.value)


def test_groups_and_sizes():
    s = QuantScheme.parse("W4G128")
    assert s.n_groups(576) == 5 and s.n_groups(1536) == 12  # partial last group counts
    assert QuantScheme.parse("W4G-1").n_groups(576) == 1
    # DESIGN.md's ideal speedups: 16 / bits-per-weight with fp16 scale+zero per group of 128
    assert round(16 / s.bits_per_weight(), 2) == 3.76
    assert round(16 / QuantScheme.parse("W3G128").bits_per_weight(), 2) == 4.92
    assert round(16 / QuantScheme.parse("W2G128").bits_per_weight(), 2) == 7.11


def test_dict_round_trip():
    s = QuantScheme.parse("W3G64-sym")
    assert QuantScheme.from_dict(s.to_dict()) == s
