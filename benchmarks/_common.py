"""Helpers shared by the benchmark scripts."""

import os


def load_average():
    """The machine's load average as one line, printed beside every timing
    (timings on a shared machine are noisy).

    Example: ``print(f"0.35 s/iter; {load_average()}")``.
    """
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unknown"
    return (
        f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on "
        f"{os.cpu_count() or 0} CPUs"
    )
