"""``python -m zroact_tasks.labels [NAME]``: a shipped label list's path (no NAME: the names)."""

import sys

from . import NAMES, path

print(path(sys.argv[1]) if len(sys.argv) > 1 else "\n".join(NAMES))
