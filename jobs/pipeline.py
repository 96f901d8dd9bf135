"""The whole pipeline: ingest -> clean -> features -> shard -> train -> evaluate -> export.

python jobs/pipeline.py --config conf/flights.yaml [--run-dir DIR]
spark-submit --master URL jobs/pipeline.py --config conf/flights.yaml [--run-dir DIR]
"""

import sys

from sparknet.cli import main
from sparknet.stages import STAGES

if __name__ == "__main__":
    sys.exit(main(list(STAGES)))
