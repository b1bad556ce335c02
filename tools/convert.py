#!/usr/bin/env python3
"""Convert a checkpoint into a pyxf model directory: tools/convert.py SRC OUT [--dtype float16]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout
from pyxf.convert import main

sys.exit(main(sys.argv[1:]))
