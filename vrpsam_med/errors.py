"""The errors that mean "bad input": the CLI prints them as one line, without a traceback."""
from vrpsam_med.io.errors import OutputExistsError, VolumeError
from vrpsam_med.io.volume import SliceIndexError
from vrpsam_med.models.backbones import CheckpointError
from vrpsam_med.prompts import AnnotationError


class UsageError(ValueError):
    """A request that cannot be carried out as asked (bad option combination, missing model...)."""


USER_ERRORS: tuple[type[Exception], ...] = (
    VolumeError, OutputExistsError, SliceIndexError, AnnotationError, CheckpointError, FileNotFoundError,
    PermissionError, UsageError,
)
