#!/usr/bin/env python3
"""Bulk import a file of image URLs into a running casimg: the same as `casimg import`.

    python scripts/bulk_import.py urls.txt --api http://127.0.0.1:9000 --key-file data/admin.key \
        --failures failed.csv --resume import.state

Run `python scripts/bulk_import.py --help` for every option.
"""

import sys
from pathlib import Path

try:
    from casimg.importer import main
except ImportError:  # run from a checkout without installing: use the package beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from casimg.importer import main

if __name__ == "__main__":
    sys.exit(main())
