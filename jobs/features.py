"""The features stage: impute, encode, scale, PCA fitted on train.

Writes features/, feature_pipeline/ and pca.json.

python jobs/features.py --config conf/flights.yaml --run-dir DIR
spark-submit --master URL jobs/features.py --config conf/flights.yaml --run-dir DIR
"""

import sys

from sparknet.cli import main

if __name__ == "__main__":
    sys.exit(main(["features"]))
