"""The parameter server: rounds, streaming aggregation, server optimizers, checkpoints."""

from enclavefl.server.aggregator import Aggregator, WeightedMean
from enclavefl.server.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, params_digest, save_checkpoint
from enclavefl.server.metrics import REQUIRED_KEYS, MetricsLog
from enclavefl.server.optimizer import SERVER_OPTIMIZERS, FedAvg, ServerOptimizer
from enclavefl.server.ps import Evaluator, ParameterServer
from enclavefl.server.rounds import Phase, RoundState

__all__ = [
    "REQUIRED_KEYS",
    "SERVER_OPTIMIZERS",
    "Aggregator",
    "Checkpoint",
    "Evaluator",
    "FedAvg",
    "MetricsLog",
    "ParameterServer",
    "Phase",
    "RoundState",
    "ServerOptimizer",
    "WeightedMean",
    "latest_checkpoint",
    "load_checkpoint",
    "params_digest",
    "save_checkpoint",
]
