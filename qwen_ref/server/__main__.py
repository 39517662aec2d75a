"""python -m qwen_ref.server ...: the same as qwen-ref serve ..."""

import sys

from qwen_ref.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
