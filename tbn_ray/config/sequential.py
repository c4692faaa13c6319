"""The sequential CERTIFY's settings (``science.sequential``): every default in one place."""

from __future__ import annotations

from pydantic import Field

from tbn_ray.config.base import _Strict


class SequentialConfig(_Strict):
    """Anytime-valid sample size: estimation draws at a fixed geometric schedule of looks, a
    Clopper-Pearson bound per look at its share of alpha (union bound), stopped once the report
    radius cannot change. Defaults chosen with ``bench/adaptive_sampling.py`` against fixed n."""

    first_look: int = Field(
        128,
        ge=1,
        description="fewest estimation draws at a look: looks are at n / growth^i down to this (just n if n is smaller)",
    )
    growth: float = Field(1.2, gt=1, le=16, description="ratio of consecutive looks' cumulative estimation draws")
    final_share: float = Field(
        0.7,
        gt=0,
        lt=1,
        description="share of alpha spent on the last look (at n); the other looks share the rest (see spend)",
    )
    spend: float = Field(
        1.0,
        ge=0,
        le=2,
        description="the other looks' shares of alpha grow as (look size) ** spend: 0 even, 1 in proportion to the draws",
    )
    stop_alpha: float = Field(
        0.02,
        gt=0,
        lt=1,
        description="level of the optimistic upper bound that decides to stop (never part of the certificate)",
    )
    skip_misclassified: bool = Field(
        True,
        description="stop after the selection draws when their guess is not the image's label: it counts in no certified accuracy or ACR whatever is drawn; recorded as abstaining, stopped 'misclassified' (false: bound every guess, for radii of wrong predictions)",
    )
