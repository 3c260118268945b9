import sys

from recalq.cli import main

sys.exit(main())
