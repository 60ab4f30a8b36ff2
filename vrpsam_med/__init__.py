"""vrpsam-med: annotate one structure on one slice, segment it across slices and patients (VRP-SAM)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vrpsam-med")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"
