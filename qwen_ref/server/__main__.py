import sys

from qwen_ref.server.app import main

sys.exit(main())
