"""`python -m course_lib.benchmarks kv|moe|mtp|ep`: run one benchmark and exit 1 if a floor is missed."""

import sys

from .cli import main

sys.exit(main())
