"""Imports rflow_tf before TensorFlow so the tests run under the same
TensorFlow runtime defaults (see ``rflow_tf/__init__.py``) as its users."""

import rflow_tf  # noqa: F401
