"""Checks that the virtualenv running this script holds exactly the locked versions.

Run by .ci/setup after installing: every installed distribution (the project itself aside) must
be in requirements.lock at the locked version (a local build tag such as torch's ``+cpu`` aside).
A version other than the locked one fails; a package the lock does not name (one installed by
hand) is only reported.
"""

import re
import sys
from importlib.metadata import distributions
from pathlib import Path

try:
    from packaging.markers import Marker
except ImportError:  # a core-only environment: pip carries packaging
    from pip._vendor.packaging.markers import Marker


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> int:
    lock_path = Path(sys.argv[1] if len(sys.argv) > 1 else "requirements.lock")
    locked: dict[str, str] = {}
    for line in lock_path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)\s*(?:;(.*))?$", line)
        if match and (match[4] is None or Marker(match[4]).evaluate()):
            locked[canonical(match[1])] = match[3]
    problems = []
    for dist in distributions():
        name = canonical(dist.metadata["Name"])
        if name == "agent-os":
            continue
        installed = dist.version.split("+", 1)[0]
        want = locked.get(name)
        if want is None:
            print(f"lockcheck: note: {name}=={dist.version} is installed but not locked", file=sys.stderr)
        elif installed != want:
            problems.append(f"{name}=={dist.version} is installed; {lock_path} has {want}")
    for problem in sorted(problems):
        print(f"lockcheck: {problem}", file=sys.stderr)
    if problems:
        print(
            "lockcheck: the environment differs from the lock (a dependency changed in pyproject.toml?"
            " run `bash .ci/lock`)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
