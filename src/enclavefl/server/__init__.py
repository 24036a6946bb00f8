"""The parameter server: engines, rounds, strategies, aggregators, server optimizers, checkpoints."""

from enclavefl.server.aggregator import Aggregator, WeightedMean
from enclavefl.server.algorithms import Algorithm, CloseContext, FedAvgAlgorithm, Scaffold
from enclavefl.server.async_engine import AsyncEngine
from enclavefl.server.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    params_digest,
    save_checkpoint,
)
from enclavefl.server.closing import ClosePipeline, Evaluator
from enclavefl.server.core import ServerCore
from enclavefl.server.engine import Engine, SyncEngine
from enclavefl.server.events import EVENT_KINDS, Event, EventBatch, EventBus
from enclavefl.server.liveness import LivenessMonitor
from enclavefl.server.metrics import REQUIRED_KEYS, MetricsLog
from enclavefl.server.optimizer import SERVER_OPTIMIZERS, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, ServerOptimizer
from enclavefl.server.phases import Phase
from enclavefl.server.ps import ParameterServer
from enclavefl.server.registry import WorkerRecord, WorkerRegistry
from enclavefl.server.round import Round, RoundRecord
from enclavefl.server.sampling import Candidate, Sampler, UniformSampler
from enclavefl.server.robust import AGGREGATORS, CoordinateMedian, Krum, NormBounded, TrimmedMean
from enclavefl.server.spill import UpdateSpill
from enclavefl.server.staleness import make_staleness
from enclavefl.server.state import PartState, Stateful
from enclavefl.server.strategy import AggregatorFactory, PostProcess, Strategy, build_strategy

__all__ = [
    "AGGREGATORS",
    "EVENT_KINDS",
    "REQUIRED_KEYS",
    "SERVER_OPTIMIZERS",
    "Aggregator",
    "AggregatorFactory",
    "Algorithm",
    "AsyncEngine",
    "Candidate",
    "Checkpoint",
    "CloseContext",
    "ClosePipeline",
    "CoordinateMedian",
    "Engine",
    "Evaluator",
    "Event",
    "EventBatch",
    "EventBus",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgAlgorithm",
    "FedAvgM",
    "FedYogi",
    "Krum",
    "LivenessMonitor",
    "MetricsLog",
    "NormBounded",
    "ParameterServer",
    "PartState",
    "Phase",
    "PostProcess",
    "Round",
    "RoundRecord",
    "Sampler",
    "Scaffold",
    "ServerCore",
    "ServerOptimizer",
    "Stateful",
    "Strategy",
    "SyncEngine",
    "TrimmedMean",
    "UniformSampler",
    "UpdateSpill",
    "WeightedMean",
    "WorkerRecord",
    "WorkerRegistry",
    "build_strategy",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "make_staleness",
    "params_digest",
    "save_checkpoint",
]
