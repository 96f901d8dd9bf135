"""The features stage: impute, encode, scale, PCA fitted on train; writes features/, feature_pipeline/, pca.json.

    python jobs/features.py --config conf/flights.yaml --run-dir DIR
    spark-submit --master URL jobs/features.py --config conf/flights.yaml --run-dir DIR
"""

import sys

from sparknet.cli import main

if __name__ == "__main__":
    sys.exit(main(["features"]))
