"""Benchmark: memory, time and error of the PS's streaming weighted mean.

Memory and time (default): for each ``--accumulate`` variant, a fresh process
folds ``--updates`` updates of a CIFAR ResNet-18's shapes (11.17M float32
values) into a WeightedMean and takes the result. It prints one line each::

    accumulate=float32 updates=20 params=11173962 add_s=1.23 result_s=0.01 state_mb=49 agg_peak_mb=95 peak_rss_mb=321

``state_mb`` is the aggregator's running state (``WeightedMean.nbytes``, or
the float64 sums plus the largest-tensor scratch for ``default`` on a version
without it); ``agg_peak_mb`` is the process's peak resident set minus its resident set
just before the aggregator existed (two distinct updates, reused with varying
weights, are made first); ``peak_rss_mb`` is the whole process's peak. The
variant ``default`` calls ``WeightedMean(template)`` with no setting, so the
same script measures an older version of the aggregator for a before/after.

Error (``--error``): ``--updates`` updates of ``--params`` values whose
magnitudes span 1e-3..1e3 and whose signs are mixed (so prefixes of the mean
are larger than the mean), with weights from 1 to 1000, summed by each method;
it prints one line per method with its bytes per value and its error against a
float64 running sum (whose own error is about 2**-53 per update)::

    method=float32_mean updates=100 params=1000000 bytes_per_value=4 max_err_bound=0.27 rms_err_bound=0.050 median_err_ulps=1.10 p99_err_ulps=41.0

``*_err_bound`` is the error over the float32 running mean's bound
(``2**-24 * sum_k (W_k/W) |m_k|`` per value, where ``m_k`` is the mean of the
first k updates and ``W_k`` their weight): 1.0 is as bad as that bound allows.
``*_err_ulps`` is the error in float32 roundings of the exact mean itself,
which is large where the terms cancel. The methods: ``float64_sum`` (the
``float64`` setting), ``float32_mean`` (the ``float32`` setting),
``float32_neumaier`` (textbook Kahan-Babuska/Neumaier in float32 arithmetic on
float32 products), ``float32_pair`` (a float32 sum plus a float32
compensation updated with float64 arithmetic: the best a float32 pair can do)
and ``float32_naive_sum`` (float32 products added in float32).

Run: ``python bench/aggregate_sum.py --accumulate default float64 float32``
and ``python bench/aggregate_sum.py --error --updates 100 --params 1000000``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from enclavefl.server.aggregator import WeightedMean
from enclavefl.tensors import ParamSet, StreamHeader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from round_overhead import _RESNET18  # noqa: E402  (the same shapes as the round benchmark)

_U = 2.0**-24


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    """The resident set now (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return _peak_mb()


def _child(variant: str, updates: int) -> None:
    rng = np.random.default_rng(0)
    pool = [ParamSet((n, rng.standard_normal(s, dtype=np.float32) * 0.01) for n, s in _RESNET18) for _ in range(2)]
    template = StreamHeader.of(pool[0])
    params = sum(int(np.prod(s)) for _, s in _RESNET18)
    before = _rss_mb()
    agg = WeightedMean(template) if variant == "default" else WeightedMean(template, accumulate=variant)  # type: ignore[arg-type]
    start = time.perf_counter()
    for i in range(updates):
        agg.add(pool[i % 2], float(1 + i % 7))
    add_s = time.perf_counter() - start
    start = time.perf_counter()
    agg.result()
    result_s = time.perf_counter() - start
    nbytes = getattr(agg, "nbytes", None)
    if nbytes is None:  # an older WeightedMean: float64 sums plus a float64 scratch of the largest tensor
        nbytes = 8 * params + 8 * max(int(np.prod(s)) for _, s in _RESNET18)
    peak = _peak_mb()
    print(
        f"accumulate={variant} updates={updates} params={params} add_s={add_s:.2f} result_s={result_s:.2f} "
        f"state_mb={nbytes / 2**20:.0f} agg_peak_mb={peak - before:.0f} peak_rss_mb={peak:.0f}",
        flush=True,
    )


def _neumaier(total: npt.NDArray[np.float32], comp: npt.NDArray[np.float32], x: npt.NDArray[np.float32]) -> None:
    """Kahan-Babuska (Neumaier) step in float32: total + comp carries the sum."""
    t = total + x
    big = np.abs(total) >= np.abs(x)
    comp += np.where(big, (total - t) + x, (x - t) + total)
    total[...] = t


def _error(updates: int, params: int) -> None:
    rng = np.random.default_rng(1)
    scale = (10.0 ** rng.uniform(-3, 3, params)).astype(np.float32)
    center = rng.standard_normal(params).astype(np.float32)
    weights = rng.integers(1, 1001, updates).astype(np.float64)
    ref_sum = np.zeros(params)            # float64 running weighted sum: the reference
    prefix = np.zeros(params)             # sum_k |S_k|, so bound = u * prefix / W
    mean32 = np.zeros(params, np.float32)  # ours: float32 running mean, float64 arithmetic
    naive = np.zeros(params, np.float32)   # float32 running sum, float32 arithmetic
    kahan, comp = np.zeros(params, np.float32), np.zeros(params, np.float32)
    hi, lo = np.zeros(params, np.float32), np.zeros(params, np.float32)  # float32 pair, float64 arithmetic
    total_w = 0.0
    for k in range(updates):
        # Mixed signs around a per-value centre: the mean is smaller than its terms.
        x = (scale * (center + 3 * rng.standard_normal(params, dtype=np.float32))).astype(np.float32)
        w = weights[k]
        ref_sum += w * x.astype(np.float64)
        prefix += np.abs(ref_sum)
        m = mean32.astype(np.float64)
        mean32[...] = m + (w / (total_w + w)) * (x - m)
        total_w += w
        wx = (np.float32(w) * x).astype(np.float32)
        naive += wx
        _neumaier(kahan, comp, wx)
        pair = hi.astype(np.float64) + lo + w * x.astype(np.float64)
        hi[...] = pair
        lo[...] = pair - hi
    ref = ref_sum / total_w
    bound = _U * prefix / total_w
    results = {
        "float64_sum": (8, (ref_sum / total_w).astype(np.float32)),
        "float32_mean": (4, mean32),
        "float32_neumaier": (8, ((kahan.astype(np.float64) + comp) / total_w).astype(np.float32)),
        "float32_pair": (8, ((hi.astype(np.float64) + lo) / total_w).astype(np.float32)),
        "float32_naive_sum": (4, (naive.astype(np.float64) / total_w).astype(np.float32)),
    }
    for name, (size, out) in results.items():
        err = np.abs(out.astype(np.float64) - ref)
        ratio = err / bound
        ulps = err / (_U * np.abs(ref))  # in float32 roundings of the mean itself (large where it cancels)
        print(
            f"method={name} updates={updates} params={params} bytes_per_value={size} "
            f"max_err_bound={ratio.max():.4f} rms_err_bound={np.sqrt(np.mean(ratio**2)):.5f} "
            f"median_err_ulps={np.median(ulps):.2f} p99_err_ulps={np.quantile(ulps, 0.99):.1f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accumulate", nargs="+", default=["float64", "float32"])
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--params", type=int, default=1_000_000, help="values per update (--error only)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every variant, alternating")
    parser.add_argument("--error", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.updates)
    elif args.error:
        _error(args.updates, args.params)
    else:
        for variant in args.accumulate * args.repeat:
            subprocess.run([sys.executable, __file__, "--child", variant, "--updates", str(args.updates)], check=True)


if __name__ == "__main__":
    main()
