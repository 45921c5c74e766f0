import sys

from kvcache.cli import main

sys.exit(main())
