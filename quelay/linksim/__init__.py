"""Link simulator: a user-space UDP proxy that impairs traffic between two agents.

The kernel here has no netem, so rate limits, delay, jitter, loss,
corruption, duplication and outages are applied by a proxy in the path.
``impairment`` is the sans-IO core (deterministic, seeded, driven by an
explicit ``now``), ``proxy`` runs it on Trio UDP sockets, ``command`` is the
CLI entry point. See docs/linksim.md.
"""

from .impairment import BIN_S, DirectionModel, DirectionStats, LinkModel
from .profiles import (
    BLOS_750MS,
    BLOS_750MS_REORDER,
    CLEAN,
    CLEAN_REORDER,
    DEGRADED_BLOS,
    DEGRADED_BLOS_REORDER,
    LOS_250MS,
    LOS_250MS_REORDER,
    PROFILES,
    DirectionParams,
    Profile,
    get_profile,
    parse_profile,
    symmetric,
    with_reordering,
)
from .proxy import LinkSim, ProxyStats, open_linksim

__all__ = [
    "BIN_S",
    "BLOS_750MS",
    "BLOS_750MS_REORDER",
    "CLEAN",
    "CLEAN_REORDER",
    "DEGRADED_BLOS",
    "DEGRADED_BLOS_REORDER",
    "LOS_250MS",
    "LOS_250MS_REORDER",
    "PROFILES",
    "DirectionModel",
    "DirectionParams",
    "DirectionStats",
    "LinkModel",
    "LinkSim",
    "Profile",
    "ProxyStats",
    "get_profile",
    "open_linksim",
    "parse_profile",
    "symmetric",
    "with_reordering",
]
