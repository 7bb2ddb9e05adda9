"""What the applications say: warnings that name columns, short warnings on the command line, and
progress bars only where someone watches them."""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from collections.abc import Iterator

__all__ = ["ADVICE", "FLAGS", "column_names_in_warnings", "progress_bars", "short_warnings"]

_COLUMN = re.compile(r"\b(column|feature) (\d+)\b")
# The library's messages name its arguments ("num_experts: ..."); the command line's, its flags.
FLAGS = {
    "num_experts": "--experts",
    "num_starts": "--starts",
    "num_chains": "--chains",
    "num_warmup": "--num-warmup",
    "num_samples": "--num-draws",
    "target_accept_prob": "--target-accept",
}
_ARGUMENT = re.compile(r"(?<![\w-])(" + "|".join(FLAGS) + r"):")
# Arguments that the library's advice names ("raise max_iterations"), for the flags that set them.
ADVICE = {"max_iterations": "--max-iterations", "max_samples": "--max-draws", "target_accept_prob": "--target-accept"}
_ADVICE = re.compile(r"(?<![\w-])(" + "|".join(ADVICE) + r")\b")
# Third-party notices about their own future: not the user's concern.
_HIDDEN = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def progress_bars(verbose: bool) -> bool:
    """Progress bars only when verbose and stdout is a terminal: in a log they are noise."""
    return verbose and sys.stdout.isatty()


def _named(text: str, names: list[str]) -> str:
    def name(match: re.Match) -> str:
        index = int(match.group(2))
        return f"{match.group(1)} {names[index]!r}" if index < len(names) else match.group(0)

    text = _ARGUMENT.sub(lambda match: FLAGS[match.group(1)] + ":", _COLUMN.sub(name, text))
    return _ADVICE.sub(lambda match: ADVICE[match.group(1)], text)


@contextlib.contextmanager
def column_names_in_warnings(names: list[str]) -> Iterator[None]:
    """Within the block, warnings that say ``column 2`` (a design column, counted from 0) say
    ``column 'dose'`` instead, ``num_experts:`` (an argument, `FLAGS`) says ``--experts:``, and advice
    that names an argument (``raise max_iterations``, `ADVICE`) names its flag; the caller's warning
    filters and handlers apply as before."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        renamed = _named(text, names)
        previous(category(renamed) if renamed != text else message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def short_warnings(command: str, *, quiet: bool) -> Iterator[None]:
    """Within the block, each distinct warning is printed once to stderr as
    ``numpyro-moe COMMAND: warning: message``. A `ReliabilityWarning` (a result whose assumptions
    fail) always is; other warnings only when not ``quiet``; third-party deprecation notices never.
    """
    seen = set()

    def show(message, category, filename, lineno, file=None, line=None):
        # Imported here: the command line checks its arguments before JAX is imported.
        from numpyro_moe import ReliabilityWarning

        text = str(message)
        if text in seen or issubclass(category, _HIDDEN):
            return
        if quiet and not issubclass(category, ReliabilityWarning):
            return
        seen.add(text)
        print(f"numpyro-moe {command}: warning: {text}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield
