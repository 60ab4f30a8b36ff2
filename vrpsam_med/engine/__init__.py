"""Segmentation engines: prompts -> masks for slices, volumes and cohorts."""
from vrpsam_med.engine.box import BoxResult, box_segment
from vrpsam_med.engine.export import OutputWriteError, export_result
from vrpsam_med.engine.segmenter import (
    Cancelled,
    SegmentationResult,
    Segmenter,
    SegmenterConfig,
    SegmenterError,
    StructureResult,
)

__all__ = ["BoxResult", "box_segment", "Cancelled", "OutputWriteError", "SegmentationResult", "Segmenter",
           "SegmenterConfig", "SegmenterError", "StructureResult", "export_result"]
