"""The train stage: DDP training in Spark barrier tasks; writes model/, train.json.

python jobs/train.py --config conf/flights.yaml --run-dir DIR
spark-submit --master URL jobs/train.py --config conf/flights.yaml --run-dir DIR
"""

import sys

from sparknet.cli import main

if __name__ == "__main__":
    sys.exit(main(["train"]))
