import sys

from pyxf.cli import main

sys.exit(main())
