"""Guest images: the content-addressed store and the builders of 'minimal' and 'debian'."""

from vzkit.images.initramfs import build_poweroff_initramfs, find_kernel
from vzkit.images.store import BuildResult, ImageStore, Progress

__all__ = [
    "BuildResult",
    "ImageStore",
    "Progress",
    "build_poweroff_initramfs",
    "find_kernel",
]
