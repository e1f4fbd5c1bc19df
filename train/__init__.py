"""Training entry points for rflow_tf (``python train/main.py --help``)."""
