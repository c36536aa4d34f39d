"""The oldest Triton the kernels in ``triton_gate.py`` and ``triton_moba.py`` build with.

3.4 is the first release with ``triton.knobs`` (read for the interpreter switch) and
``tl.topk`` (the gate's bitonic merge). Importing either kernel module with an older Triton
raises ``ImportError`` naming this minimum, instead of an ``AttributeError`` deep in a call.
"""

from __future__ import annotations

import re

TRITON_MIN = (3, 4)


def _parse(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def require_triton(version: str) -> None:
    """Raise ``ImportError`` if Triton ``version`` (``triton.__version__``) is below ``TRITON_MIN``."""
    if _parse(version) < TRITON_MIN:
        need = ".".join(map(str, TRITON_MIN))
        raise ImportError(f"moba_dist's Triton kernels need triton>={need}, found triton {version}; "
                          f"upgrade with `pip install 'triton>={need}'`")
