"""Score raw rows with a run's artifact; writes scores/, rejects/ and summary.json.

python jobs/predict.py --config conf/flights.yaml --run-dir DIR --input PATH \
    [--format csv|parquet|json] --output OUT [--set KEY=VALUE ...] [--log-level LEVEL]
"""

import sys

from sparknet.predict import main

if __name__ == "__main__":
    sys.exit(main())
