"""dad: distil monocular depth estimators the Distill-Any-Depth way, from cached teacher outputs."""

__version__ = "0.1.0"
