"""When in a federated round a model checkpoint is taken."""

from enum import Enum


class CheckpointMode(Enum):
    """Pre-aggregation: after local training. Post-aggregation: after receiving the global model."""

    PRE_AGGREGATION = "pre_aggregation"
    POST_AGGREGATION = "post_aggregation"
