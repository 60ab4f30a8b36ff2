"""Segmentation engines: prompts -> masks for slices, volumes and cohorts."""
from vrpsam_med.engine.box import BoxResult, box_segment
from vrpsam_med.engine.segmenter import (
    Cancelled,
    SegmentationResult,
    Segmenter,
    SegmenterConfig,
    SegmenterError,
    StructureResult,
)

__all__ = ["BoxResult", "box_segment", "Cancelled", "SegmentationResult", "Segmenter", "SegmenterConfig",
           "SegmenterError", "StructureResult"]
