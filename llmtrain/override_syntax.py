"""The syntax of one Hydra override on a command line: Hydra's parse, and where it fails one line with a
form that works. A leaf (Hydra and errors only): the training CLI and `python -m llmtrain.data.prepare`
both use it."""

from hydra.core.override_parser.overrides_parser import OverridesParser

from llmtrain.errors import UserError


def first_line(exc: BaseException) -> str:
    """The problem in an OmegaConf/Hydra error message. Text only: their messages put it on the first line,
    followed by `full_key:`/`reference_type=` lines or Hydra's usage notes, and no attribute holds it alone
    (OmegaConf's `msg` has the same extra lines; a parse error has only its text)."""
    text = getattr(exc, "msg", None) or str(exc)
    return text.strip().splitlines()[0].strip() if text.strip() else type(exc).__name__


def quoted(key: str, value: str) -> str:
    """A copy-pasteable shell argument that hands Hydra `key` with `value` as one quoted string."""
    return f"\"{key}='{value}'\""


def parse_override(arg: str, parser: OverridesParser | None = None):
    """One `key=value` argument as Hydra parses it; where it cannot, one line with a quoted form that does
    (e.g. `eos=<|endoftext|>` -> `"eos='<|endoftext|>'"`)."""
    key, _, value = arg.partition("=")
    try:
        (ov,) = (parser or OverridesParser.create()).parse_overrides([arg])
    except Exception as e:
        if any(ord(c) > 127 for c in value):
            problem = "Hydra reads non-ASCII characters only inside quotes"
        else:
            problem = f"cannot parse it ({first_line(e)})"
        raise UserError(f"{arg}: {problem}; write it as {quoted(key, value)}") from None
    return ov
