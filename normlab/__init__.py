"""normlab: normalization layers written from the papers, and the experiments of the normlab book."""

__version__ = "0.1.0"
