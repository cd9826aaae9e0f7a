"""argparse for the tools (`llmtrain.convert`, `llmtrain.eval`): range-checked flags, errors in one line."""

import argparse
import sys

from llmtrain.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + error; the project's rule is one line naming the flag, the problem and the fix."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(UserError.exit_code)


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse
