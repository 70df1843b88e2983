"""Errors the Python API raises about its own arguments, in the API's words.

``InvalidArgument('shots', 'must be at least 2, got 1')`` reads ``shots must be at least 2, got 1`` from Python;
the command line shows the same message with the argument's flag (``--shots must be ...``), because it knows
which flag fills which argument. A message may name other arguments too, as ``{name}`` in ``detail`` with the
name in ``mentions`` (``give another {csv_path}, or drop {resume}``): each reads as its name from Python and as
its flag on the command line.
"""
from __future__ import annotations

from typing import Callable, Sequence


class InvalidArgument(ValueError):
    """A bad value of the API argument ``argument``; ``detail`` says what is wrong with it, naming the arguments of
    ``mentions`` (and ``argument`` itself) as ``{name}``."""

    def __init__(self, argument: str, detail: str, mentions: Sequence[str] = ()) -> None:
        self.argument, self.detail, self.mentions = argument, detail, tuple(mentions)
        super().__init__(self.worded(lambda name: name))

    def worded(self, name_of: Callable[[str], str]) -> str:
        """The message with each argument it names called ``name_of(argument)`` (the command line: its flag)."""
        detail = self.detail
        for name in {self.argument, *self.mentions}:
            detail = detail.replace('{' + name + '}', name_of(name))
        return f'{name_of(self.argument)} {detail}'

    def __reduce__(self):  # pickled whole (rank 0's refusal is broadcast to the other ranks)
        return type(self), (self.argument, self.detail, self.mentions)
