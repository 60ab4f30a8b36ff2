"""Segmentation engines: prompts -> masks for slices, volumes and cohorts."""
from vrpsam_med.engine.box import BoxResult, box_segment

__all__ = ["BoxResult", "box_segment"]
