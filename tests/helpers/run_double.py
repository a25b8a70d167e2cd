"""Entry point: `torchrun ... tests/helpers/run_double.py --config X a.b=c` trains the test double."""
import os
import sys

# As in tests/helpers/rank_entry.py: the repository root, not this script's folder, goes first on sys.path
# (a test folder named like a package, tests/launcher or tests/modeling, must not shadow it).
_root = os.path.dirname(os.path.abspath(__file__))
while not os.path.exists(os.path.join(_root, "pytest.ini")) and os.path.dirname(_root) != _root:
    _root = os.path.dirname(_root)
sys.path[0] = _root

from notellm2.launcher.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", "--components", "tests.helpers.doubles:components", *sys.argv[1:]]))
