"""The hub's division of its total cap (core/share.py): max-min fairness, in numbers."""

from hypothesis import given
from hypothesis import strategies as st

from quelay.core.share import effective_rates, max_min_shares


def test_equal_shares_when_no_link_is_limited() -> None:
    assert max_min_shares(3_000_000, {"a": 0, "b": 0, "c": 0}) == {
        "a": 1_000_000, "b": 1_000_000, "c": 1_000_000}


def test_a_capped_link_leaves_what_it_cannot_use_to_the_others() -> None:
    shares = max_min_shares(3_000_000, {"a": 500_000, "b": 0, "c": 2_000_000})
    assert shares == {"a": 500_000, "b": 1_250_000, "c": 1_250_000}


def test_links_capped_below_the_total_get_their_caps() -> None:
    assert max_min_shares(10_000_000, {"a": 1_000_000, "b": 2_000_000}) == {
        "a": 1_000_000, "b": 2_000_000}


def test_idle_links_reserve_nothing_and_keep_their_own_cap_within_the_total() -> None:
    rates = effective_rates(2_000_000, {"a": 0, "b": 500_000, "c": 4_000_000}, {"a"})
    assert rates == {"a": 2_000_000, "b": 500_000, "c": 2_000_000}


def test_no_total_means_every_link_has_its_own_cap() -> None:
    assert effective_rates(0, {"a": 7, "b": 0}, {"a", "b"}) == {"a": 7, "b": 0}


def test_floor_keeps_a_share_usable() -> None:
    rates = effective_rates(30_000, {n: 0 for n in "abcdef"}, set("abcdef"), floor=11_184)
    assert set(rates.values()) == {11_184}


@given(st.integers(1, 10**9), st.dictionaries(st.text("abcdefgh", min_size=1, max_size=3),
                                              st.integers(0, 10**9), max_size=12))
def test_max_min_properties(total: int, caps: dict[str, int]) -> None:
    shares = max_min_shares(total, caps)
    assert set(shares) == set(caps)
    assert sum(shares.values()) <= total
    for name, share in shares.items():
        assert share >= 0
        if caps[name]:
            assert share <= caps[name]
    # Max-min: a link below its cap has at least as much as any other link.
    for name, share in shares.items():
        if not caps[name] or share < caps[name]:
            assert all(share >= other for other in shares.values()) or \
                all(share + 1 >= other for other in shares.values())
    # Nothing wasted: unless every link is at its cap, the total is used (to rounding).
    if caps and any(not caps[n] or shares[n] < caps[n] for n in caps):
        assert total - sum(shares.values()) < len(caps)
