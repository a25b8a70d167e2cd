"""The one problem counter of the data path: how many inputs had a given problem, and the first few of
them (an id, or "file:line"), each with a short reason. Used by `notellm2 data validate` (the catalog
checks) and `notellm2 data write-shards` (its manifest's `problems`)."""
from __future__ import annotations

from dataclasses import dataclass, field

KEEP_FIRST = 5


@dataclass
class Problem:
    kind: str = ""
    count: int = 0
    first: list = field(default_factory=list)  # the first offending ids (or "file:line")
    details: list = field(default_factory=list)  # a short reason per entry of `first`, when there is one
    keep_all: bool = False  # also keep every entry (all_ids, all_details): for a full problem log
    all_ids: list = field(default_factory=list)
    all_details: list = field(default_factory=list)

    def add(self, ident: str, detail: str = "", keep: int = KEEP_FIRST) -> None:
        self.count += 1
        if len(self.first) < keep:
            self.first.append(ident)
            self.details.append(detail)
        if self.keep_all:
            self.all_ids.append(ident)
            self.all_details.append(detail)

    def to_dict(self) -> dict:
        return {"count": self.count, "first": list(self.first), "details": list(self.details)}
