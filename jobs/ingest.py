"""The ingest stage: copy the raw files into <run-dir>/raw.

python jobs/ingest.py --config conf/flights.yaml --run-dir DIR
spark-submit --master URL jobs/ingest.py --config conf/flights.yaml --run-dir DIR
"""

import sys

from sparknet.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest"]))
