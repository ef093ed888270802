"""Checks a built wheel against the source tree (run by .ci/wheel-check).

The wheel must install one top-level name, ``agent_os`` (beside its dist-info), hold every
Python module of the package's source folders under its import name, and have the same files
with the same contents as a second wheel (the one built from the tree when the first came from
the sdist).
"""

import hashlib
import os
import sys
import zipfile
from pathlib import Path


def contents(wheel: str) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as archive:
        return {
            name: hashlib.sha256(archive.read(name)).hexdigest()
            for name in archive.namelist()
            if ".dist-info/" not in name
        }


def source_modules() -> set[str]:
    """Every .py file reachable from the agent_os folder (its links to the part folders included)."""
    found = set()
    for folder, dirs, names in os.walk("agent_os", followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found.update(Path(folder, name).as_posix() for name in names if name.endswith(".py"))
    return found


def main() -> int:
    first, second = sys.argv[1], sys.argv[2]
    files = contents(first)
    problems = []
    top = {name.split("/", 1)[0] for name in files}
    if top != {"agent_os"}:
        problems.append(f"top-level names {sorted(top)}, expected only agent_os")
    missing = source_modules() - set(files)
    problems += [f"{name} is not in the wheel" for name in sorted(missing)]
    other = contents(second)
    if other != files:
        differ = sorted(set(files) ^ set(other) | {n for n in files if n in other and files[n] != other[n]})
        problems.append(f"the wheel from the sdist and the one from the tree differ: {differ[:10]}")
    for problem in problems:
        print(f"wheel-check: {problem}", file=sys.stderr)
    if not problems:
        print(f"wheel-check: {len(files)} files, all {len(source_modules())} modules, one import root")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
