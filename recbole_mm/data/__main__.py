import sys

from recbole_mm.data.cli import main

sys.exit(main())
