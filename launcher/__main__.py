import sys

from notellm2.launcher.cli import main

sys.exit(main())
