"""Which SecAgg+ rounds can finish: the one home of the round-size and dropout rules.

A SecAgg+ round (Bell et al., CCS 2020) over the ``n1`` sites that advertised keys runs on a
graph of degree ``k = degree(n1)`` with threshold ``t = threshold_for(k)``
(:mod:`securefl.secagg.graph`).  It aborts, after every site has trained on its data and been
charged for it, unless

* ``n1 >= min_neighbours + 1`` and ``k >= min_neighbours`` (every site refuses a smaller
  neighbourhood, :class:`~securefl.config.secagg.SecAggConfig`), and
* every survivor keeps ``t`` live neighbours (its self-mask seed and each dropped neighbour's
  key are rebuilt from ``t`` shares, Bonawitz et al., CCS 2017, section 4): in the worst case
  all dropped sites are neighbours of one survivor, so a round survives ``k - t`` dropped
  sites.

A site that is not connected when the round opens never advertises, so it shrinks ``n1``
rather than counting as a dropout.  These rules are checked before training (the config
decides them), by the deployment server before each round (it knows who is connected), and by
the round state machines themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from securefl.config.secagg import SecAggConfig
from securefl.secagg.graph import auto_neighbours, degree, threshold_for

__all__ = ["RoundShape", "round_problem", "round_shape", "smallest_round"]


@dataclass(frozen=True)
class RoundShape:
    """The graph of a SecAgg+ round over ``sites`` advertising sites."""

    sites: int
    neighbours: int  #: k
    threshold: int  #: t

    @property
    def tolerated(self) -> int:
        """``k - t``: dropped sites the round survives in the worst case."""
        return self.neighbours - self.threshold

    def describe(self) -> str:
        return (f"a round of {self.sites} sites has k = {self.neighbours} neighbours and "
                f"threshold t = {self.threshold}, so it survives {self.tolerated} dropped "
                f"site{'' if self.tolerated == 1 else 's'}")


def round_shape(sites: int, config: SecAggConfig) -> RoundShape | None:
    """``(k, t)`` of a round over ``sites`` advertising sites, as the server announces it;
    ``None`` when fewer than two sites cannot form a graph."""
    if sites < 2:
        return None
    requested = auto_neighbours(sites) if config.neighbours == "auto" else int(config.neighbours)
    k = degree(sites, neighbours=requested)
    return RoundShape(sites, k, threshold_for(k, fraction=config.threshold))


def smallest_round(config: SecAggConfig) -> int:
    """The fewest advertising sites a round can finish with (``min_neighbours + 1`` or more
    when the configured degree needs it)."""
    sites = config.min_neighbours + 1
    while (shape := round_shape(sites, config)) is None or shape.neighbours < config.min_neighbours:
        sites += 1
    return sites


def round_problem(sites: int, config: SecAggConfig) -> str | None:
    """Why a SecAgg+ round over ``sites`` advertising sites aborts whatever happens, or
    ``None`` when it can finish."""
    shape = round_shape(sites, config)
    if (shape is not None and sites >= config.min_neighbours + 1
            and shape.neighbours >= config.min_neighbours):
        return None
    return (f"secure aggregation needs at least {smallest_round(config)} sites in a round "
            f"(each site accepts no fewer than min_neighbours = {config.min_neighbours} "
            "neighbours)")
