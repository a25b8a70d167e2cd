"""Slurm host lists ("rack[3-4]-gpu[01-02],x"), expanded as `scontrol show hostnames` expands them: the
one parser of the stack. `notellm2.launcher.distributed` takes the rendezvous host from it under plain
`srun`, and `slurm/rendezvous.sh` runs this file (`python3 notellm2/hostlist.py first NODELIST`), so both
name the same head node.

Rules (checked against scontrol of Slurm 22.05 in tests/test_hostlist.py):
- entries are separated by commas or white space outside brackets; empty entries are skipped;
- a bracket group holds ranges and single numbers separated by commas: `[07-09,12]`;
- a range keeps the width of its first number: `[01-3]` -> 01 02 03, `[8-11]` -> 8 9 10 11;
- several groups in one entry expand as a product, the first group outermost:
  `rack[3-4]-gpu[01-02]` -> rack3-gpu01, rack3-gpu02, rack4-gpu01, rack4-gpu02;
- a descending range, a group that is not numbers, an unclosed or nested bracket is an error.

Standard library only, and no import of the three packages: the shell script runs this file with any
python3, before a virtual environment is on the path.
"""
from __future__ import annotations

import itertools
import re
import sys

_SEPARATORS = ",\t\n "
_ENTRY_PART = re.compile(r"\[([^\[\]]*)\]|([^\[\]]+)")


class HostListError(ValueError):
    """A node list that is not a Slurm host list; the message quotes it."""


def _split_entries(nodelist: str) -> list[str]:
    """Top-level entries: commas and white space split, except inside brackets."""
    entries, current, depth = [], [], 0
    for ch in nodelist:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise HostListError(f"host list {nodelist!r}: nested '['")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostListError(f"host list {nodelist!r}: ']' without '['")
        if ch in _SEPARATORS and depth == 0:
            entries.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise HostListError(f"host list {nodelist!r}: '[' without ']'")
    entries.append("".join(current))
    return [e for e in entries if e]


def _expand_group(group: str, nodelist: str) -> list[str]:
    """"07-09,12" -> ["07", "08", "09", "12"]."""
    out = []
    for item in group.split(","):
        lo, sep, hi = item.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise HostListError(f"host list {nodelist!r}: [{group}] is not numbers and ranges such as [01-04,07]")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise HostListError(f"host list {nodelist!r}: descending range {item} in [{group}]")
        width = len(lo)
        out.extend(f"{n:0{width}d}" for n in range(int(lo), int(hi) + 1))
    return out


def expand(nodelist: str) -> list[str]:
    """Every host of `nodelist`, in the order scontrol prints them (duplicates kept)."""
    hosts = []
    for entry in _split_entries(nodelist):
        parts = []
        for m in _ENTRY_PART.finditer(entry):
            group, text = m.groups()
            parts.append(_expand_group(group, nodelist) if group is not None else [text])
        hosts.extend("".join(p) for p in itertools.product(*parts))
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of `nodelist` (the head node of a job); HostListError when it names none."""
    hosts = expand(nodelist)
    if not hosts:
        raise HostListError(f"host list {nodelist!r}: names no host")
    return hosts[0]


def main(argv: list[str]) -> int:
    usage = "usage: hostlist.py {first|expand} NODELIST"
    if len(argv) != 2 or argv[0] not in ("first", "expand"):
        print(usage, file=sys.stderr)
        return 2
    try:
        hosts = [first_host(argv[1])] if argv[0] == "first" else expand(argv[1])
    except HostListError as e:
        print(f"hostlist.py: {e}", file=sys.stderr)
        return 2
    print("\n".join(hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
