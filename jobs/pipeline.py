"""The whole pipeline: ingest -> clean -> features -> shard -> train -> evaluate -> export.

python jobs/pipeline.py --config conf/flights.yaml [--run-dir DIR] [--set KEY=VALUE ...]
    [--force [STAGE ...]]
spark-submit --master URL jobs/pipeline.py --config conf/flights.yaml [--run-dir DIR]

Stages whose outputs in DIR are up to date are skipped; rerun after a failure, it
continues from the stage that failed.
"""

import sys

from sparknet.cli import main
from sparknet.stages import STAGES

if __name__ == "__main__":
    sys.exit(main(list(STAGES)))
