import sys

from mftk.cli import main

sys.exit(main())
