"""The one exception type for user mistakes, and the did-you-mean of their messages."""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Iterable


class UserError(Exception):
    """A mistake in the user's input (a sweep file, a flag, a data folder, a checkpoint).

    The message is one line that names the file, the key and the fix. Bugs raise other types.
    """

    exit_code = 2


def did_you_mean(value: object, candidates: Iterable[str]) -> str:
    """ " (did you mean 'x'?)" for the closest candidate, else "; known: a, b, c".

    Among the close matches (difflib's, in order of similarity) the longest common prefix wins,
    so 'resnet21' suggests 'resnet20', not 'resnet32'.
    """
    value, candidates = str(value), [str(c) for c in candidates]
    close = difflib.get_close_matches(value, candidates, n=5, cutoff=0.6)
    if close:
        best = max(close, key=lambda c: _common_prefix(value, c))
        return f" (did you mean '{best}'?)"
    return f"; known: {', '.join(sorted(candidates))}"


def _common_prefix(a: str, b: str) -> int:
    same = itertools.takewhile(lambda pair: pair[0] == pair[1], zip(a, b, strict=False))
    return sum(1 for _ in same)
