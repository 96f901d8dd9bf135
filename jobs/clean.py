"""The clean stage: parse, reject with reasons, join; writes clean/, rejects/, quality.json.

python jobs/clean.py --config conf/flights.yaml --run-dir DIR
spark-submit --master URL jobs/clean.py --config conf/flights.yaml --run-dir DIR
"""

import sys

from sparknet.cli import main

if __name__ == "__main__":
    sys.exit(main(["clean"]))
