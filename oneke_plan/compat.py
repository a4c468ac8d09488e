"""The differences between the transformers versions we support (4.46 through 5.x), in one place."""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def dtype_kwarg() -> str:
    """The from_pretrained/from_config keyword for the weights' dtype: `dtype` since 4.56, `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def no_init_weights() -> Any:
    """transformers' context manager that skips weight initialization (pointless on the meta device, and the
    slowest part of building a 70B model there): in transformers.initialization since 5.0, modeling_utils before."""
    import importlib

    try:
        module = importlib.import_module("transformers.initialization")
    except ImportError:
        module = importlib.import_module("transformers.modeling_utils")
    return module.no_init_weights()


def dtype_kw(dtype: Any) -> dict[str, Any]:
    """`{"dtype": dtype}` or `{"torch_dtype": dtype}`, whichever this transformers' from_pretrained takes."""
    return {dtype_kwarg(): dtype}


TRANSFORMERS_BNB_CPU = "4.53"  # before it, transformers runs bitsandbytes on the CPU only with Intel's IPEX


@cache
def bnb_quantizes_on_cpu() -> bool:
    """Whether this transformers lets bitsandbytes quantize a model that sits on the CPU alone. Before 4.53 its
    bitsandbytes integration required Intel's IPEX for the CPU (and 4.46-4.50 crash in that check)."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(TRANSFORMERS_BNB_CPU)
