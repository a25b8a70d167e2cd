"""Entry point: `torchrun ... tests/train/run_double.py --config X a.b=c` trains the test double."""
import sys

from launcher.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--components", "tests.train.doubles:components", *sys.argv[1:]]))
