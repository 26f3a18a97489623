"""Unit handling for the user-facing functions.

The primitives themselves only ever see plain arrays: each wrapper splits
``saiunit.Quantity`` arguments into mantissa and unit, binds on the
mantissas, and re-attaches the combined unit to the result.
"""

from __future__ import annotations

from typing import Any

import saiunit as u

from ._checks import as_array

__all__ = ["split_unit", "product_unit", "attach_unit", "bias_in_unit"]


def split_unit(value: Any) -> tuple[Any, u.Unit]:
    """``(mantissa, unit)`` of a quantity; a plain array gets the unitless unit."""
    return u.get_mantissa(value), u.get_unit(value)


def product_unit(*units: u.Unit) -> u.Unit:
    """The unit of a product of quantities with these units."""
    result: u.Unit = u.UNITLESS
    for unit in units:
        product = result * unit
        assert isinstance(product, u.Unit)
        result = product
    return result


def attach_unit(mantissa: Any, unit: u.Unit) -> Any:
    """``mantissa * unit``, or the plain array when ``unit`` is dimensionless."""
    if unit.is_unitless:
        return mantissa
    return u.maybe_decimal(u.Quantity(mantissa, unit=unit))


def bias_in_unit(bias: Any, unit: u.Unit, where: str) -> Any:
    """The mantissa of ``bias`` expressed in ``unit`` (the unit of ``x * weight``).

    Raises
    ------
    ValueError
        If the bias's dimension differs from ``unit``'s; the message names both units.
    """
    mantissa = as_array(u.get_mantissa(bias), where, "bias")
    bias_unit = u.get_unit(bias)
    if bias_unit.dim != unit.dim:
        raise ValueError(
            f"{where}: bias has unit {bias_unit} but x * weight has unit {unit}; "
            f"the bias must carry a unit of the same dimension as {unit}."
        )
    # A plain bias is a pure number; a scaled dimensionless unit (mV/V) still needs rescaling.
    return u.Quantity(mantissa, unit=bias_unit).to_decimal(unit)
