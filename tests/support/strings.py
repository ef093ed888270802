"""Hostile ``str`` subclasses for tests of code that checks or caches text."""

from __future__ import annotations

from collections.abc import Iterator
from typing import SupportsIndex


class LooseStr(str):
    """Compares '.' and ' ' alike: equal to text that is not its own."""

    def _k(self) -> str:
        return str.replace(self, ".", " ")

    def __hash__(self) -> int:
        return hash(self._k())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and str.replace(other, ".", " ") == self._k()

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)


class SneakyStr(str):
    """Hides its text from the checks that iterate or split it."""

    def __iter__(self) -> Iterator[str]:
        return iter("ok")

    def split(self, sep: str | None = None, maxsplit: SupportsIndex = -1) -> list[str]:
        return ["ok"]
