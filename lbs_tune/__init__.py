"""lbs-tune: Ray Tune sweeps for the science of large batch sizes."""

__version__ = "0.1.0"
