"""The differences between the transformers versions we support (4.46 through 5.x), in one place."""

from __future__ import annotations

from functools import cache


@cache
def dtype_kwarg() -> str:
    """The from_pretrained/from_config keyword for the weights' dtype: `dtype` since 4.56, `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
