"""Metal-on-CPU simulator: runs unmodified .metal compute kernels on Linux
(see README.md). Public API: build(), Library.launch(), MetalSimError."""

from .harness import BuildError, Library, LaunchResult, MetalSimError, build, preprocess

__all__ = ["BuildError", "Library", "LaunchResult", "MetalSimError", "build", "preprocess"]
