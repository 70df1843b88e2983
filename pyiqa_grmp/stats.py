"""The one place correlations are computed: SRCC, PLCC (plain Pearson), KRCC (tau-b), the PLCC after the VQEG
4-parameter logistic fit, and percentile bootstrap intervals over resampled images.

Every coefficient has one implementation, vectorised over rows so that a bootstrap computes thousands of
resamples at once; a single pair of vectors is one row. Values agree with scipy's ``spearmanr``, ``pearsonr`` and
``kendalltau`` to rounding. Only numpy and scipy are used.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Sequence, Tuple

import numpy as np

CORRELATIONS = ('srcc', 'plcc', 'krcc')
KENDALL_PAIRWISE_MAX = 64


# ------------------------------------------------------------------------------------------- coefficients
def _ranks(rows: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(rows, axis=-1)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair; NaN where a row is constant."""
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((x * x).sum(axis=-1) * (y * y).sum(axis=-1))
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(denominator > 0, (x * y).sum(axis=-1) / np.where(denominator > 0, denominator, 1), np.nan)


def _kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row pair; NaN where a row is constant. Pairwise signs for up to
    ``KENDALL_PAIRWISE_MAX`` images (fast for bootstrap resamples), scipy's O(n log n) per row above that."""
    from scipy.stats import kendalltau

    count = x.shape[-1]
    if count > KENDALL_PAIRWISE_MAX:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # constant rows give NaN
            return np.array([kendalltau(a, b)[0] for a, b in zip(x, y)], dtype=float)
    values = np.empty(x.shape[0])
    chunk = max(1, 4_000_000 // (count * count))
    for start in range(0, x.shape[0], chunk):
        a, b = x[start:start + chunk], y[start:start + chunk]
        sign_a = np.sign(a[:, :, None] - a[:, None, :])
        sign_b = np.sign(b[:, :, None] - b[:, None, :])
        concordance = (sign_a * sign_b).sum(axis=(1, 2))
        untied = np.sqrt(np.abs(sign_a).sum(axis=(1, 2)) * np.abs(sign_b).sum(axis=(1, 2)))
        with np.errstate(invalid='ignore', divide='ignore'):
            values[start:start + chunk] = np.where(untied > 0, concordance / np.where(untied > 0, untied, 1), np.nan)
    return values


ROW_STATISTICS: Dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    'srcc': lambda x, y: _pearson_rows(_ranks(x), _ranks(y)),
    'plcc': _pearson_rows,
    'krcc': _kendall_rows,
}


def _one(name: str, x: Sequence[float], y: Sequence[float]) -> float:
    return float(ROW_STATISTICS[name](np.asarray(x, dtype=float)[None], np.asarray(y, dtype=float)[None])[0])


def srcc(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    return _one('srcc', x, y)


def plcc(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's linear correlation; NaN when either side is constant."""
    return _one('plcc', x, y)


def krcc(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b; NaN when either side is constant."""
    return _one('krcc', x, y)


def correlation_values(pred: Sequence[float], mos: Sequence[float]) -> Dict[str, float]:
    """SRCC, PLCC (plain Pearson) and KRCC (tau-b) of predictions against labels (higher-better both)."""
    return {name: _one(name, pred, mos) for name in CORRELATIONS}


# ----------------------------------------------------------------------------------------- logistic PLCC
def logistic_4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The 4-parameter logistic of VQEG: ``(b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2``."""
    from scipy.special import expit

    with np.errstate(divide='ignore', invalid='ignore'):
        return (b1 - b2) * expit((np.asarray(x, dtype=float) - b3) / abs(b4)) + b2


def fit_logistic(pred: np.ndarray, mos: np.ndarray) -> np.ndarray:
    """Least-squares (b1, b2, b3, b4) of :func:`logistic_4` from ``pred`` to ``mos``; ValueError saying why not.

    The fit runs on standardised predictions (so metrics of any scale are equally well conditioned), starting
    from the label range, the centre of the predictions and a slope of one standard deviation.
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    pred, mos = np.asarray(pred, dtype=float), np.asarray(mos, dtype=float)
    if len(pred) < 4:
        raise ValueError(f'the 4-parameter logistic needs at least 4 images, got {len(pred)}')
    if np.ptp(pred) == 0:
        raise ValueError('the predictions are constant, so the logistic fit is undefined')
    centre, scale = pred.mean(), pred.std()
    rising = np.corrcoef(pred, mos)[0, 1] >= 0 if np.ptp(mos) > 0 else True
    high, low = (mos.max(), mos.min()) if rising else (mos.min(), mos.max())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', OptimizeWarning)  # judged by the fitted values below
            (b1, b2, b3, b4), _ = curve_fit(logistic_4, (pred - centre) / scale, mos, p0=[high, low, 0.0, 1.0],
                                            maxfev=20000)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f'the 4-parameter logistic fit did not converge ({error})') from error
    params = np.array([b1, b2, centre + scale * b3, scale * abs(b4)])
    fitted = logistic_4(pred, *params)
    if not np.all(np.isfinite(fitted)) or np.ptp(fitted) == 0:
        raise ValueError('the 4-parameter logistic fit is flat or not finite')
    return params


def logistic_plcc(pred: Sequence[float], mos: Sequence[float]) -> Tuple[float, np.ndarray]:
    """PLCC of the fitted logistic values against ``mos``, and the fit; ValueError when there is no fit.

    A decreasing fit (a metric that ranks backwards) correlates positively with the labels; its sign keeps the
    value consistent with SRCC and PLCC.
    """
    pred, mos = np.asarray(pred, dtype=float), np.asarray(mos, dtype=float)
    params = fit_logistic(pred, mos)
    direction = 1.0 if params[0] >= params[1] else -1.0
    return direction * plcc(logistic_4(pred, *params), mos), params


# --------------------------------------------------------------------------------------------- bootstrap
def bootstrap_indices(count: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, count) image indices drawn with replacement; the same seed gives the same draws."""
    return np.random.default_rng(seed).integers(0, count, size=(resamples, count))


def _percentile_interval(values: np.ndarray, confidence: float) -> Tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    return float(np.nanpercentile(values, tail)), float(np.nanpercentile(values, 100 - tail))


def bootstrap_intervals(pred: Sequence[float], mos: Sequence[float], indices: np.ndarray,
                        confidence: float = 0.95) -> Dict[str, Tuple[float, float]]:
    """Percentile bootstrap intervals of SRCC, PLCC and KRCC over the resamples ``indices`` of the images."""
    pred, mos = np.asarray(pred, dtype=float), np.asarray(mos, dtype=float)
    return {name: _percentile_interval(ROW_STATISTICS[name](pred[indices], mos[indices]), confidence)
            for name in CORRELATIONS}


def bootstrap_gain_intervals(before: Sequence[float], after: Sequence[float], mos: Sequence[float],
                             indices: np.ndarray, confidence: float = 0.95) -> Dict[str, Tuple[float, float]]:
    """Paired percentile intervals of (after - before) per correlation: both models on the same resamples."""
    before, after, mos = (np.asarray(v, dtype=float) for v in (before, after, mos))
    return {name: _percentile_interval(ROW_STATISTICS[name](after[indices], mos[indices]) -
                                       ROW_STATISTICS[name](before[indices], mos[indices]), confidence)
            for name in CORRELATIONS}
