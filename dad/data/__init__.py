"""Datasets: procedural RGB-D scenes (``synthetic``)."""

from dad.data.synthetic import render_scene, write_synthetic_dataset

__all__ = ["render_scene", "write_synthetic_dataset"]
