import sys

from casimg.cli import main

sys.exit(main())
