"""The export stage: the inference artifact (feature pipeline, lookups, network,
TorchScript, model card); writes artifact/.

python jobs/export.py --config conf/flights.yaml --run-dir DIR
"""

import sys

from sparknet.cli import main

if __name__ == "__main__":
    sys.exit(main(["export"]))
