"""The benchmark: sparknet against in-memory feeding, more workers, TorchDistributor,
Spark ML and scikit-learn, pandas preprocessing, and larger data; see
docs/benchmarks.md.

python jobs/benchmark.py --config conf/flights.yaml --out runs/benchmark [--smoke]
"""

import sys

from sparknet.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
