"""Argument checks shared by the `rflow_tf.data` modules (private)."""

from __future__ import annotations

from typing import Optional

import numpy as np


def check_n_bits(n_bits) -> int:
    """``n_bits`` as an int in 1..8 (a TypeError / ValueError naming it otherwise)."""
    if isinstance(n_bits, bool) or not isinstance(n_bits, (int, np.integer)):
        raise TypeError(f'n_bits must be an int in 1..8, got {n_bits!r}.')
    if not 1 <= int(n_bits) <= 8:
        raise ValueError(f'n_bits must be in 1..8, got {n_bits}.')
    return int(n_bits)


def check_positive_int(value, what: str) -> int:
    """``value`` as a positive int (a TypeError / ValueError naming ``what`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f'{what} must be a positive int, got {value!r}.')
    if int(value) <= 0:
        raise ValueError(f'{what} must be a positive int, got {value}.')
    return int(value)


def check_seed(seed) -> Optional[int]:
    """``seed`` as an int, or None (a TypeError otherwise)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f'seed must be an int or None, got {seed!r}.')
    return int(seed)


def one_line(err: BaseException, limit: int = 300) -> str:
    """``"<ErrorType>: <first line of its message>"``, cut at ``limit`` characters."""
    text = str(err).strip().splitlines()
    text = text[0] if text else ''
    if len(text) > limit:
        text = text[:limit] + '...'
    return f'{type(err).__name__}: {text}'
