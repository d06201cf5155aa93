import sys

from hashret.cli import main

sys.exit(main())
