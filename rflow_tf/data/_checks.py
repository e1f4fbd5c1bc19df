"""Argument checks shared by the `rflow_tf.data` modules (private)."""

from __future__ import annotations

from typing import Optional

import numpy as np


def _check_n_bits(n_bits) -> int:
    if isinstance(n_bits, bool) or not isinstance(n_bits, (int, np.integer)):
        raise TypeError(f'n_bits must be an int in 1..8, got {n_bits!r}.')
    if not 1 <= int(n_bits) <= 8:
        raise ValueError(f'n_bits must be in 1..8, got {n_bits}.')
    return int(n_bits)


def _check_positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f'{what} must be a positive int, got {value!r}.')
    if int(value) <= 0:
        raise ValueError(f'{what} must be a positive int, got {value}.')
    return int(value)


def _check_seed(seed) -> Optional[int]:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f'seed must be an int or None, got {seed!r}.')
    return int(seed)


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    text = text[0] if text else ''
    if len(text) > limit:
        text = text[:limit] + '...'
    return f'{type(err).__name__}: {text}'
