"""The checks of the losses' constructor arguments: each returns the value converted, or raises LossSettingError
(a ValueError) naming the argument."""
import math
import operator

from .channel import LossSettingError


def positive_number(name, value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise LossSettingError(f'{name} must be a positive number, got {value!r}') from None
    if not 0 < value < math.inf:
        raise LossSettingError(f'{name} must be a positive number, got {value}')
    return value


def integer(name, value):
    try:
        integral = not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError, OverflowError):  # None, a string, nan, inf
        integral = False
    if not integral:
        raise LossSettingError(f'{name} must be an integer, got {value!r}')
    return int(value)


def integer_at_least(name, value, minimum, why=''):
    value = integer(name, value)
    if value < minimum:
        raise LossSettingError(f'{name} must be at least {minimum}{why}, got {value}')
    return value


def at_most(name, value, limit_name, limit, why=''):
    if value > limit:
        raise LossSettingError(f'{name} must be at most {limit_name} ({limit}){why}, got {value}')


def switch(name, value):
    if not isinstance(value, bool):
        raise LossSettingError(f'{name} must be True or False, got {value!r}')
    return value


def number(name, value):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise LossSettingError(f'{name} must be a number, got {value!r}') from None


def check_channels(name, value):
    try:
        value = operator.index(value)
    except TypeError:
        raise LossSettingError(f'{name} must be a whole number >= 1, got {value!r}') from None
    if value < 1:
        raise LossSettingError(f'{name} must be a whole number >= 1, got {value}')
    return value


def check_weight(name, value):
    value = float(value)
    if not (value >= 0 and math.isfinite(value)):
        raise LossSettingError(f'{name} must be a number >= 0, got {value}')
    return value
