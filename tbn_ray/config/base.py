"""What every config model shares: strict, frozen, finite numbers; ``8/255``-style fractions.

Its own module so that config sections defined in files of their own (the sequential sampler's)
can be fields of the experiment config without an import cycle."""

from __future__ import annotations

from fractions import Fraction
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict


def _number(v: Any) -> Any:
    """Accept ``8/255``-style strings, the way l-inf budgets are usually written."""
    if isinstance(v, str):
        try:
            return float(Fraction(v.strip()))
        except (ValueError, ZeroDivisionError):
            pass
        try:
            return float(v)  # "inf" and "nan" are numbers here, refused as not finite by the model
        except ValueError as e:
            raise ValueError(f"not a number: {v!r}") from e
    return v


#: A float that may also be written as a fraction, as l-inf budgets are (``8/255``); its command-line
#: flag takes text, so that the config reads the fraction.
Number = Annotated[float, BeforeValidator(_number)]


class _Strict(BaseModel):
    # allow_inf_nan=False: a sigma of inf or an alpha of NaN must fail here, not store NaN statistics.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
