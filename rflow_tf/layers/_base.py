"""Shared constants of the rflow_tf Keras layers (private)."""

#: The package name under which the layers register for Keras serialisation
#: ("rflow_tf>LipSwish", ...); saved configs refer to it, never change it.
PACKAGE = "rflow_tf"
