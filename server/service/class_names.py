"""Classes by name: `class_name` in a request, and `GET /classes?q=`.

A class's name may list synonyms, as the ImageNet names do ("tench, Tinca tinca"); any of them names
the class. Matching ignores case: an exact name wins, otherwise a prefix that only one class has
("ankle" -> "Ankle boot", "golden retr" -> "golden retriever"). Anything else is an error that lists
the closest names, so that a client can correct itself.
"""

from __future__ import annotations

import difflib
from functools import lru_cache


class ClassNameError(ValueError):
    """No class, or more than one, goes by the name; the message lists the candidates."""


class ClassIndex:
    def __init__(self, names: tuple[str, ...]):
        self.names = names
        # (lower-cased synonym, class id), for every synonym of every class and the whole name itself
        self._keys: list[tuple[str, int]] = []
        for i, name in enumerate(names):
            forms = {name.strip().lower(), *(s.strip().lower() for s in name.split(","))}
            self._keys += [(form, i) for form in sorted(forms) if form]

    def resolve(self, query: str) -> int:
        q = " ".join(query.split()).lower()  # runs of spaces count as one
        if not q:
            raise ClassNameError("class_name is empty; see GET /classes for the names")
        for match in (lambda key: key == q, lambda key: key.startswith(q)):
            ids = sorted({i for key, i in self._keys if match(key)})
            if len(ids) == 1:
                return ids[0]
            if ids:
                shown = ", ".join(self._label(i) for i in ids[:8]) + (", ..." if len(ids) > 8 else "")
                raise ClassNameError(f"{query!r} names {len(ids)} classes: {shown}; type more of the name, or "
                                     "send class_id")
        raise ClassNameError(f"no class is named {query!r}; closest: {self._closest(q)} "
                             f"(GET /classes?q=... searches the names)")

    def search(self, query: str) -> list[int]:
        """Ids whose name contains `query` (case-insensitive), in id order."""
        q = " ".join(query.split()).lower()
        return [i for i, name in enumerate(self.names) if q in name.lower()]

    def _label(self, i: int) -> str:
        return f"{self.names[i]!r} ({i})"

    def _closest(self, q: str) -> str:
        keys = [key for key, _ in self._keys]
        ids: list[int] = []
        for key in [k for k in keys if q in k] + difflib.get_close_matches(q, keys, n=5, cutoff=0.5):
            i = next(i for k, i in self._keys if k == key)
            if i not in ids:
                ids.append(i)
        return ", ".join(self._label(i) for i in ids[:5]) or "none (see GET /classes)"


@lru_cache(maxsize=4)
def class_index(names: tuple[str, ...]) -> ClassIndex:
    return ClassIndex(names)
