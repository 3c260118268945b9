"""`python -m outbox`: run one relay with recalq's settings until SIGINT or SIGTERM."""

import sys

from recalq.cli import main

if __name__ == "__main__":
    sys.exit(main(["relay", *sys.argv[1:]]))
