"""The shard stage: write the splits as Petastorm-readable Parquet; writes shards/, shards.json.

python jobs/shard.py --config conf/flights.yaml --run-dir DIR
spark-submit --master URL jobs/shard.py --config conf/flights.yaml --run-dir DIR
"""

import sys

from sparknet.cli import main

if __name__ == "__main__":
    sys.exit(main(["shard"]))
