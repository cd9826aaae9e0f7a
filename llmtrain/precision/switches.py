"""The precision layer's on/off switches from the environment (LLMTRAIN_KERNEL_CHECK, LLMTRAIN_ONE_PASS).

1 turns a switch on, 0 off, unset or empty leaves its default; anything else is one error line, so a
`false` or `off` is never read as on.
"""

import os

from llmtrain.errors import UserError


def switch(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if value not in ("0", "1"):
        raise UserError(f"{name}={value!r}: allowed values are 1 (on) and 0 (off); unset keeps the default")
    return value == "1"
