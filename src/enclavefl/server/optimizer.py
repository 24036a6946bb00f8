"""Server optimizers: turn the mean client delta into the next global model.

FedAvg (McMahan et al., 2017) is SGD with a server learning rate on the mean
delta. FedAvgM adds server momentum (Hsu et al., 2019, "Measuring the Effects
of Non-Identical Data Distribution for Federated Visual Classification").
FedAdagrad, FedAdam and FedYogi are the adaptive server optimizers of Reddi et
al., 2021, "Adaptive Federated Optimization", Algorithm 2, implemented as
written there: no bias correction.

How this works: a stateful optimizer keeps its moments in a :class:`_Moments`
store, one buffer per floating parameter and moment kind, named
``"m/<param>"`` and ``"v/<param>"``. The buffers are made on the first step
from the parameters' shapes. A step computes in float64, stores the new moments
as float32 (float16/float32 parameters) or float64 (float64 parameters), and
commits them only once every tensor has been computed, so a failed step leaves
the optimizer as it was. The next step reads the stored, rounded moments, never
a wider private copy, so an optimizer restored from :meth:`ServerOptimizer.state`
continues bit for bit like the one that saved it. Integer tensors (counters such
as BatchNorm's ``num_batches_tracked``) get no moments and follow the FedAvg
rule, ``x + rint(lr * delta)``.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Final, TypeAlias, final

import numpy as np
import numpy.typing as npt

from enclavefl.errors import CheckpointError
from enclavefl.server.state import PartState
from enclavefl.tensors import ParamSet, SparseRows, Tensor

__all__ = [
    "SERVER_OPTIMIZERS",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "ServerOptimizer",
    "register_optimizer",
]

Array: TypeAlias = npt.NDArray[Any]
# State tensor name -> (shape, dtype): what a set of moment buffers looks like.
_Layout: TypeAlias = dict[str, tuple[tuple[int, ...], np.dtype[Any]]]

# The update of v in Algorithm 2: (v_{t-1}, delta_t^2) -> v_t, float64 arrays.
_SecondMoment: TypeAlias = Callable[[Array, Array], Array]

_F32: Final = np.dtype(np.float32)
_F64: Final = np.dtype(np.float64)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive(owner: str, setting: str, value: float) -> float:
    """`value` as a float if it is finite and > 0, else ValueError naming the setting."""
    if not (_is_real(value) and 0 < value < float("inf")):
        raise ValueError(f"{owner}: {setting} must be a finite number > 0, got {value!r}")
    return float(value)


def _fraction(owner: str, setting: str, value: float) -> float:
    """`value` as a float if it is in [0, 1), else ValueError naming the setting."""
    if not (_is_real(value) and 0 <= value < 1):
        raise ValueError(f"{owner}: {setting} must be in [0, 1), got {value!r}")
    return float(value)


def _dense(value: Tensor) -> Array:
    return value.to_dense() if isinstance(value, SparseRows) else value


def _dtype_of(value: Tensor) -> np.dtype[Any]:
    return value.rows.dtype if isinstance(value, SparseRows) else value.dtype


def _moment_dtype(param_dtype: np.dtype[Any]) -> np.dtype[Any]:
    """float64 moments for float64 parameters, float32 for float16 and float32 ones."""
    return _F64 if param_dtype.itemsize == 8 else _F32


def _dense_pairs(owner: str, params: ParamSet, mean_delta: ParamSet) -> Iterator[tuple[str, Array, Array]]:
    """(name, param, delta) as dense arrays, one tensor at a time, for a delta that fits `params`.

    Raises:
        ValueError: at once if the delta lacks a parameter or has an extra tensor;
            while iterating, at the first tensor whose shapes differ.
    """
    missing = [name for name in params if name not in mean_delta]
    extra = [name for name in mean_delta if name not in params]
    if missing or extra:
        what = f"lacks tensor {missing[0]!r}" if missing else f"has unexpected tensor {extra[0]!r}"
        raise ValueError(f"{owner}: the mean delta {what} ({len(params)} parameters, {len(mean_delta)} deltas)")
    return _iter_dense_pairs(owner, params, mean_delta)


def _iter_dense_pairs(owner: str, params: ParamSet, mean_delta: ParamSet) -> Iterator[tuple[str, Array, Array]]:
    # One at a time: densifying a sparse embedding delta costs a whole table.
    for name, value in params.items():
        x, d = _dense(value), _dense(mean_delta[name])
        if d.shape != x.shape:
            raise ValueError(f"{owner}: delta {name!r} has shape {d.shape}, the parameter has {x.shape}")
        yield name, x, d


def _fedavg_update(x: Array, d: Array, lr: float) -> Array:
    """x + lr * d in x's dtype; integer tensors round the step half to even."""
    if x.dtype.kind == "f":
        new = (d * lr).astype(x.dtype, copy=False)
        if isinstance(new, np.ndarray) and new.ndim:
            # Added into the step's own fresh array: the same sum (addition commutes exactly), one
            # model-sized temporary fewer at the round's close, which matters for a model of gigabytes.
            np.add(x, new, out=new)
        else:
            new = x + new
    else:
        new = (x + np.rint(d * lr)).astype(x.dtype)
    return np.asarray(new, dtype=x.dtype)  # 0-d arithmetic yields numpy scalars


def _layout_of(tensors: Mapping[str, Tensor]) -> _Layout:
    return {name: (tuple(value.shape), _dtype_of(value)) for name, value in tensors.items()}


def _moment_layout(params: ParamSet, kinds: tuple[str, ...]) -> _Layout:
    """The moment buffers `params` need: one per floating tensor and kind, in parameter order."""
    layout: _Layout = {}
    for name, value in params.items():
        dtype = _dtype_of(value)
        if dtype.kind == "f":
            for kind in kinds:
                layout[f"{kind}/{name}"] = (tuple(value.shape), _moment_dtype(dtype))
    return layout


def _mismatch(expected: _Layout, found: _Layout) -> str | None:
    """The first difference between two layouts, as a message naming the tensor, or None."""
    missing = [name for name in expected if name not in found]
    if missing:
        return f"tensor {missing[0]!r} is missing ({len(missing)} of {len(expected)} missing)"
    extra = [name for name in found if name not in expected]
    if extra:
        return f"unexpected tensor {extra[0]!r} ({len(extra)} unexpected)"
    for name, (shape, dtype) in expected.items():
        found_shape, found_dtype = found[name]
        if found_shape != shape:
            return f"tensor {name!r} has shape {found_shape}, expected {shape}"
        if found_dtype != dtype:
            return f"tensor {name!r} has dtype {found_dtype}, expected {dtype}"
    return None


class _Moments:
    """The moment buffers (``"<kind>/<param>"`` -> array) and step count of one optimizer.

    Buffers are replaced by each step, never written in place, and kept
    read-only, so :meth:`state` hands them out without copying the model.
    """

    def __init__(self, owner: str, kinds: tuple[str, ...], *, nonnegative: tuple[str, ...] = ()) -> None:
        self._owner = owner
        self._kinds = kinds
        self._nonnegative = nonnegative
        self._step = 0
        self._buffers: dict[str, Array] | None = None  # None until the first step (or a loaded step > 0)
        self._loaded = False  # buffers came from load() and have not met the params yet

    def current(self, params: ParamSet, initial: Mapping[str, float]) -> dict[str, Array]:
        """The buffers a step on `params` starts from; fresh ones (kind -> `initial`) on the first step.

        Raises:
            CheckpointError: loaded buffers do not fit `params`.
            ValueError: `params` do not fit the buffers of earlier steps.
        """
        expected = _moment_layout(params, self._kinds)
        if self._buffers is None:
            return {
                name: np.full(shape, initial[name.partition("/")[0]], dtype=dtype)
                for name, (shape, dtype) in expected.items()
            }
        problem = _mismatch(expected, _layout_of(self._buffers))
        if problem is not None:
            if self._loaded:
                raise CheckpointError(f"{self._owner}: the loaded state does not fit the model: {problem}")
            raise ValueError(f"{self._owner}: params do not fit the moments of earlier steps: {problem}")
        return self._buffers

    def commit(self, buffers: dict[str, Array]) -> None:
        """Adopt the buffers a step computed and count the step."""
        for array in buffers.values():
            array.flags.writeable = False
        self._buffers = buffers
        self._step += 1
        self._loaded = False

    def state(self) -> PartState:
        return PartState(meta={"step": self._step}, tensors=ParamSet(self._buffers or {}))

    def load(self, state: PartState) -> None:
        """Validate `state` completely, then adopt a copy of it.

        Raises:
            CheckpointError: naming the meta key or tensor that is wrong; nothing changed.
        """
        step = self._check_meta(state.meta)
        self._check_tensors(state.tensors)
        if step == 0 and len(state.tensors):
            raise CheckpointError(
                f"{self._owner}: state at step 0 must hold no moments, found {len(state.tensors)} tensors"
            )
        if step > 0 and self._buffers is not None:
            problem = _mismatch(_layout_of(self._buffers), _layout_of(state.tensors))
            if problem is not None:
                raise CheckpointError(f"{self._owner}: the state does not fit this optimizer's moments: {problem}")
        if step == 0:
            self._buffers = None  # the initial state: buffers are made again on the next step
            self._loaded = False
        else:
            buffers = {name: np.array(_dense(value), copy=True) for name, value in state.tensors.items()}
            for array in buffers.values():
                array.flags.writeable = False
            self._buffers = buffers
            self._loaded = True
        self._step = step

    def _check_meta(self, meta: Mapping[str, Any]) -> int:
        extra = [key for key in meta if key != "step"]
        if extra:
            raise CheckpointError(f"{self._owner}: unexpected state meta key {extra[0]!r}; expected only 'step'")
        if "step" not in meta:
            raise CheckpointError(f"{self._owner}: state meta key 'step' is missing")
        step = meta["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f"{self._owner}: state meta 'step' must be an int >= 0, got {step!r}")
        return step

    def _check_tensors(self, tensors: ParamSet) -> None:
        names = " and ".join(f"'{kind}/<param>'" for kind in self._kinds)
        groups: dict[str, dict[str, Array]] = {}
        for name, value in tensors.items():
            kind, slash, param = name.partition("/")
            if kind not in self._kinds or not slash or not param:
                raise CheckpointError(f"{self._owner}: unexpected state tensor {name!r}; expected {names}")
            if isinstance(value, SparseRows):
                raise CheckpointError(f"{self._owner}: state tensor {name!r} is sparse_rows, expected dense")
            if value.dtype not in (_F32, _F64):
                raise CheckpointError(
                    f"{self._owner}: state tensor {name!r} has dtype {value.dtype}, expected float32 or float64"
                )
            if kind in self._nonnegative and not np.all(value >= 0):
                raise CheckpointError(f"{self._owner}: state tensor {name!r} holds negative or NaN values")
            groups.setdefault(param, {})[kind] = value
        for param, group in groups.items():
            for kind in self._kinds:
                if kind not in group:
                    raise CheckpointError(f"{self._owner}: state tensor '{kind}/{param}' is missing")
            first_kind, first = next(iter(group.items()))
            for kind, value in group.items():
                if value.shape != first.shape or value.dtype != first.dtype:
                    raise CheckpointError(
                        f"{self._owner}: state tensor '{kind}/{param}' is {value.dtype}{value.shape}, "
                        f"but '{first_kind}/{param}' is {first.dtype}{first.shape}"
                    )


class ServerOptimizer(ABC):
    """Produces version r+1 of the global model from version r and the mean client delta.

    Every optimizer takes the server learning rate as its first positional
    argument (the registry builds them from it); other settings are
    keyword-only. Not thread-safe: the parameter server steps it from one thread
    at a time.

    Attributes:
        name: the key of the class in :data:`SERVER_OPTIMIZERS`.
        lr: the server learning rate.
    """

    name: ClassVar[str]

    def __init__(self, lr: float) -> None:
        """Raises ValueError unless `lr` is a finite number > 0."""
        self.lr = _positive(type(self).__name__, "lr", lr)

    @abstractmethod
    def step(self, params: ParamSet, mean_delta: ParamSet) -> ParamSet:
        """Return the new global parameters, with the same names, shapes and dtypes.

        Inputs are never mutated (sparse_rows tensors come back dense). A step
        either completes, moving the optimizer's state on by one, or raises and
        leaves that state unchanged.

        Raises:
            ValueError: `mean_delta` does not match `params` (names or shapes), or
                `params` no longer match the moments of earlier steps.
            CheckpointError: state given to :meth:`load_state` does not fit `params`.
        """

    def state(self) -> PartState:
        """A snapshot of the optimizer's state for a checkpoint (empty for a stateless one).

        The snapshot's arrays are read-only and never change afterwards.
        """
        return PartState()

    def load_state(self, state: PartState) -> None:
        """Replace the optimizer's state by `state` (as :meth:`state` returned it).

        Raises:
            CheckpointError: `state` has a wrong or missing meta key, or a tensor
                with a wrong name, shape or dtype; the optimizer is unchanged.
                A stateless optimizer accepts only an empty state.
        """
        if state.meta or len(state.tensors):
            keys = ", ".join(repr(key) for key in state.meta) or "none"
            first = next(iter(state.tensors), None)
            tensors = f"{len(state.tensors)} tensors" + (f" (first {first!r})" if first is not None else "")
            raise CheckpointError(
                f"{type(self).__name__} keeps no state, expected an empty one, "
                f"found meta keys {keys} and {tensors}"
            )


@final
class FedAvg(ServerOptimizer):
    """x_{t+1} = x_t + lr * delta_t (lr = 1 is plain FedAvg: the mean of the client models)."""

    name: ClassVar[str] = "fedavg"

    def __init__(self, lr: float = 1.0) -> None:
        super().__init__(lr)

    def step(self, params: ParamSet, mean_delta: ParamSet) -> ParamSet:
        return ParamSet(
            (name, _fedavg_update(x, d, self.lr)) for name, x, d in _dense_pairs("FedAvg", params, mean_delta)
        )


@final
class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (Hsu et al., 2019).

    m_t = momentum * m_{t-1} + delta_t and x_{t+1} = x_t + lr * m_t, with
    m_{-1} = 0. Hsu et al. call the buffer v; it is stored as ``"m/<param>"``.
    """

    name: ClassVar[str] = "fedavgm"

    def __init__(self, lr: float = 1.0, *, momentum: float = 0.9) -> None:
        """Raises ValueError unless lr > 0 and 0 <= momentum < 1."""
        super().__init__(lr)
        self.momentum = _fraction("FedAvgM", "momentum", momentum)
        self._moments = _Moments("FedAvgM", ("m",))

    def step(self, params: ParamSet, mean_delta: ParamSet) -> ParamSet:
        pairs = _dense_pairs("FedAvgM", params, mean_delta)
        old = self._moments.current(params, {"m": 0.0})
        moments: dict[str, Array] = {}
        out: list[tuple[str, Array]] = []
        for name, x, d in pairs:
            if x.dtype.kind != "f":
                out.append((name, _fedavg_update(x, d, self.lr)))
                continue
            key = f"m/{name}"
            m = self.momentum * old[key].astype(np.float64) + d.astype(np.float64)
            new = x.astype(np.float64) + self.lr * m
            moments[key] = np.asarray(m, dtype=_moment_dtype(x.dtype))
            out.append((name, np.asarray(new, dtype=x.dtype)))
        self._moments.commit(moments)
        return ParamSet(out)

    def state(self) -> PartState:
        """``{"step": t}`` and the momentum buffers ``"m/<param>"``."""
        return self._moments.state()

    def load_state(self, state: PartState) -> None:
        self._moments.load(state)


def _adaptive_step(
    owner: str,
    moments: _Moments,
    params: ParamSet,
    mean_delta: ParamSet,
    *,
    lr: float,
    beta1: float,
    tau: float,
    second_moment: _SecondMoment,
) -> ParamSet:
    """One step of Algorithm 2 (Reddi et al., 2021) on every floating tensor.

    m_t = beta1 m_{t-1} + (1 - beta1) delta, v_t = second_moment(v_{t-1}, delta^2),
    x_{t+1} = x_t + lr m_t / (sqrt(v_t) + tau); m_{-1} = 0 and v_{-1} = tau^2.
    """
    pairs = _dense_pairs(owner, params, mean_delta)
    old = moments.current(params, {"m": 0.0, "v": tau * tau})
    new_moments: dict[str, Array] = {}
    out: list[tuple[str, Array]] = []
    for name, x, d in pairs:
        if x.dtype.kind != "f":
            out.append((name, _fedavg_update(x, d, lr)))
            continue
        m_key, v_key = f"m/{name}", f"v/{name}"
        d64 = d.astype(np.float64)
        m = beta1 * old[m_key].astype(np.float64) + (1.0 - beta1) * d64
        v = second_moment(old[v_key].astype(np.float64), d64 * d64)
        new = x.astype(np.float64) + lr * m / (np.sqrt(v) + tau)
        store = _moment_dtype(x.dtype)
        new_moments[m_key] = np.asarray(m, dtype=store)
        new_moments[v_key] = np.asarray(v, dtype=store)
        out.append((name, np.asarray(new, dtype=x.dtype)))
    moments.commit(new_moments)
    return ParamSet(out)



class _Adaptive(ServerOptimizer):
    """The step of Algorithm 2 (Reddi et al. 2021) shared by the three adaptive optimizers.

    m_t = beta1 m_{t-1} + (1 - beta1) delta_t and
    x_{t+1} = x_t + lr m_t / (sqrt(v_t) + tau), with m_{-1} = 0, v_{-1} = tau^2 and
    no bias correction (as in the paper, unlike client-side Adam). A subclass says
    only how v moves (:meth:`_second_moment`). State: ``{"step": t}`` and the
    moments ``"m/<param>"`` and ``"v/<param>"``.
    """

    def __init__(self, lr: float, *, beta1: float, tau: float) -> None:
        """Raises ValueError unless lr > 0, 0 <= beta1 < 1 and tau > 0."""
        super().__init__(lr)
        owner = type(self).__name__
        self.beta1 = _fraction(owner, "beta1", beta1)
        self.tau = _positive(owner, "tau", tau)
        self._moments = _Moments(owner, ("m", "v"), nonnegative=("v",))

    @abstractmethod
    def _second_moment(self, v: Array, d2: Array) -> Array:
        """v_t from v_{t-1} and delta_t^2 (float64 arrays)."""

    def step(self, params: ParamSet, mean_delta: ParamSet) -> ParamSet:
        return _adaptive_step(type(self).__name__, self._moments, params, mean_delta, lr=self.lr,
                              beta1=self.beta1, tau=self.tau, second_moment=self._second_moment)

    def state(self) -> PartState:
        return self._moments.state()

    def load_state(self, state: PartState) -> None:
        self._moments.load(state)


@final
class FedAdagrad(_Adaptive):
    """FedAdagrad: v_t = v_{t-1} + delta_t^2. beta1 = 0 is Adagrad without momentum."""

    name: ClassVar[str] = "fedadagrad"

    def __init__(self, lr: float, *, beta1: float = 0.0, tau: float = 1e-3) -> None:
        super().__init__(lr, beta1=beta1, tau=tau)

    def _second_moment(self, v: Array, d2: Array) -> Array:
        return v + d2


@final
class FedAdam(_Adaptive):
    """FedAdam: v_t = beta2 v_{t-1} + (1 - beta2) delta_t^2."""

    name: ClassVar[str] = "fedadam"

    def __init__(self, lr: float, *, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        """Raises ValueError unless lr > 0, 0 <= beta1, beta2 < 1 and tau > 0."""
        super().__init__(lr, beta1=beta1, tau=tau)
        self.beta2 = _fraction("FedAdam", "beta2", beta2)

    def _second_moment(self, v: Array, d2: Array) -> Array:
        return self.beta2 * v + (1.0 - self.beta2) * d2


@final
class FedYogi(_Adaptive):
    """FedYogi: v_t = v_{t-1} - (1 - beta2) delta_t^2 sign(v_{t-1} - delta_t^2).

    v moves towards delta^2 by an additive step instead of Adam's multiplicative
    one, so a burst of large deltas does not make v forget its history.
    """

    name: ClassVar[str] = "fedyogi"

    def __init__(self, lr: float, *, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        """Raises ValueError unless lr > 0, 0 <= beta1, beta2 < 1 and tau > 0."""
        super().__init__(lr, beta1=beta1, tau=tau)
        self.beta2 = _fraction("FedYogi", "beta2", beta2)

    def _second_moment(self, v: Array, d2: Array) -> Array:
        # v stays > 0: it grows when v < d2 and, when v > d2, loses less than d2.
        step: Array = (1.0 - self.beta2) * d2 * np.sign(v - d2)
        return v - step


#: Server optimizers by the name a job file gives (``server.optimizer``).
_REGISTRY: dict[str, type[ServerOptimizer]] = {cls.name: cls for cls in (FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi)}

SERVER_OPTIMIZERS: Final[Mapping[str, type[ServerOptimizer]]] = MappingProxyType(_REGISTRY)
"""Server optimizers by name (read-only view; add one with :func:`register_optimizer`)."""


def register_optimizer(cls: type[ServerOptimizer]) -> type[ServerOptimizer]:
    """Makes ``cls`` available as ``server.optimizer: {name: <cls.name>, options: {...}}``.

    Usable as a class decorator. The module defining it must be imported on the
    PS before the job starts (a user task module is: put the class there).

    Raises:
        ValueError: the name is taken by another class, or is not a plain identifier.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{cls.__name__}.name must be an identifier, got {name!r}")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"server optimizer name {name!r} is taken by {existing.__name__}")
    _REGISTRY[name] = cls
    return cls
