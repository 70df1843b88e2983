"""Errors the Python API raises about its own arguments, in the API's words.

``InvalidArgument('shots', 'must be at least 2, got 1')`` reads ``shots must be at least 2, got 1`` from Python;
the command line shows the same message with the argument's flag (``--shots must be ...``), because it knows
which flag fills which argument.
"""
from __future__ import annotations


class InvalidArgument(ValueError):
    """A bad value of the API argument ``argument``; ``detail`` says what is wrong with it."""

    def __init__(self, argument: str, detail: str) -> None:
        self.argument, self.detail = argument, detail
        super().__init__(f'{argument} {detail}')
