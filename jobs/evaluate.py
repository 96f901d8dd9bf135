"""The evaluate stage: score the test split; writes metrics.json.

python jobs/evaluate.py --config conf/flights.yaml --run-dir DIR
spark-submit --master URL jobs/evaluate.py --config conf/flights.yaml --run-dir DIR
"""

import sys

from sparknet.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate"]))
