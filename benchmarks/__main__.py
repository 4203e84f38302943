"""`python -m benchmarks`: the suite (see benchmarks/suite.py)."""

from .suite import main

main()
