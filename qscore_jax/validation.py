"""The checks of every input of the statistics and of every option's range, in one place.

Every public function of :mod:`qscore_jax.stats`, :mod:`qscore_jax.streaming` and
:mod:`qscore_jax.regularizer`, and every options object (``AnalysisConfig``,
``ProbeConfig``, ``RegularizerConfig``, the finetune configs, ...), checks its
inputs here, and a wrong input is an :class:`InputError` (a ``ValueError``) whose
message says what was wrong and what to do. Two kinds of checks:

* **static** checks look only at what ``jax.jit`` knows while tracing: shapes,
  number of dimensions, dtypes. They run on every call, also inside ``jax.jit``,
  ``vmap``, ``grad`` and ``shard_map`` (where they fail at trace time);
* **value** checks need the numbers: NaN or inf in the representations, values
  beyond the float32 range before the float32 cast, feature indices in range,
  option values (eps > 0, 0 <= lo < hi <= 100). They run when the argument is
  concrete (a NumPy array, a list, a Python number, a ``jax.Array`` outside a
  trace) and are skipped for tracers. Inside jitted code they are opt-in: call
  :func:`check_representations` in the function and wrap it with
  ``jax.experimental.checkify.checkify`` (then ``error.throw()``).

What D may be: a bool mask of shape (d,) (what
:func:`~qscore_jax.stats.discriminative_features` returns), or, outside a trace,
distinct integer feature indices in [0, d), converted to that mask. A float
vector, a count vector (integers with repeats), a mask of another length, or
integer indices inside ``jax.jit`` are errors: a count or a float is not a set
of features, and a traced index list cannot be range-checked.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

FLOAT32_MAX = float(np.finfo(np.float32).max)
# Rows named in an error message about NaN/inf or overflowing rows.
ROWS_NAMED = 5


class InputError(ValueError):
  """A wrong input (array or option); the message says what was wrong and what to do."""


def is_traced(x: Any) -> bool:
  """Whether ``x`` is a JAX tracer (inside ``jit``, ``vmap``, ``grad``...): no value checks.

  Args:
    x: anything.
  Returns:
    True for a tracer.
  """
  return isinstance(x, jax.core.Tracer)


def _as_array(x):
  """``x`` as an array without moving it: jax.Array and NumPy arrays stay, the rest via NumPy."""
  return x if isinstance(x, (np.ndarray, jax.Array, jax.core.Tracer)) else np.asarray(x)


def _has_values(x) -> bool:
  """Whether the values of ``x`` can be read here (concrete and on this process)."""
  if is_traced(x):
    return False
  return not isinstance(x, jax.Array) or x.is_fully_addressable


def _is_real(dtype) -> bool:
  dtype = np.dtype(dtype)
  return dtype != np.bool_ and (np.issubdtype(dtype, np.integer)
                                or np.issubdtype(dtype, np.floating)
                                or dtype.name == 'bfloat16')


# ------------------------------------------------------------------ representations

def check_matrix(h, what: str = 'representations'):
  """The static checks of representations: shape (N, d) and a real dtype. Returns ``h`` as an array.

  Args:
    h: representations, array-like or a tracer.
    what: what they are, for the message.
  Returns:
    ``h`` as an array (NumPy, jax.Array or tracer; not copied).
  Raises:
    InputError: not 2-D, or of a bool, complex or non-numeric dtype.
  """
  try:
    h = _as_array(h)
  except (ValueError, TypeError) as error:
    raise InputError(f'{what} must be an array of shape (N, d), got {type(h).__name__} '
                     f'that NumPy cannot read as one ({error}).') from None
  if h.ndim != 2:
    raise InputError(f'{what} must have shape (N, d) (one row per sample), got shape '
                     f'{tuple(h.shape)}. Reshape them, e.g. h.reshape(len(h), -1).')
  if not _is_real(h.dtype):
    raise InputError(f'{what} must hold real numbers (a float or integer dtype), got dtype '
                     f'{h.dtype}.')
  return h


class BadRows:
  """Rows of representations that hold NaN/inf or values beyond the float32 range.

  Fed chunk by chunk (:meth:`add`), it counts both kinds and keeps the first
  :data:`ROWS_NAMED` row numbers of each; :meth:`raise_if_any` raises one
  :class:`InputError` naming them. Streaming passes feed it only the chunks
  their kernel found non-finite, so the clean path costs nothing.

  Args:
    what: what the rows are, for the message (default ``'representations'``).
  """

  def __init__(self, what: str = 'representations'):
    self.what = what
    self.nonfinite = 0
    self.overflow = 0
    self.first_nonfinite: list[int] = []
    self.first_overflow: list[int] = []

  def add(self, rows, first_row: int = 0, valid=None) -> None:
    """Counts the bad rows of one chunk (on the host).

    Args:
      rows: (n, d) the chunk, in its original dtype (before any float32 cast).
      first_row: the row number of its first row.
      valid: optional (n,) bool; rows where it is False (padding) are skipped.
    """
    rows = np.asarray(rows)
    if rows.dtype.kind == 'f' or rows.dtype.name == 'bfloat16':
      finite = np.isfinite(rows)
      nonfinite = ~finite.all(axis=-1)
      if rows.dtype.itemsize > 4:
        with np.errstate(invalid='ignore'):
          overflow = ~nonfinite & (np.abs(np.where(finite, rows, 0)) > FLOAT32_MAX).any(axis=-1)
      else:
        overflow = np.zeros(len(rows), bool)
    else:
      nonfinite = overflow = np.zeros(len(rows), bool)
    if valid is not None:
      valid = np.asarray(valid, bool)
      nonfinite, overflow = nonfinite & valid, overflow & valid
    for mask, first in ((nonfinite, self.first_nonfinite), (overflow, self.first_overflow)):
      room = ROWS_NAMED - len(first)
      if room > 0:
        first.extend(int(i) + first_row for i in np.flatnonzero(mask)[:room])
    self.nonfinite += int(nonfinite.sum())
    self.overflow += int(overflow.sum())

  def raise_if_any(self, total: int) -> None:
    """Raises :class:`InputError` when a bad row was added.

    Args:
      total: the number of rows checked, for the message.
    Raises:
      InputError: naming how many rows hold NaN/inf (or overflow float32) and the first ones.
    """
    if self.nonfinite:
      raise InputError(
          f'{self.nonfinite} of {total} rows of the {self.what} contain NaN or inf '
          f'({_rows(self.first_nonfinite, self.nonfinite)}). The model produced non-finite '
          'values (diverged weights, wrong preprocessing or a bfloat16 overflow); Q-Score is '
          'undefined for them. Find them with ~np.isfinite(h).all(axis=1).')
    if self.overflow:
      raise InputError(
          f'{self.overflow} of {total} rows of the {self.what} hold values beyond the float32 '
          f'range (|x| > {FLOAT32_MAX:.3g}; {_rows(self.first_overflow, self.overflow)}). The '
          'statistics are computed in float32, where these values would become inf. Rescale '
          'the representations (e.g. divide by their largest absolute value) or find why they '
          'are that large.')


def _rows(first: list[int], count: int) -> str:
  listed = ', '.join(str(i) for i in first)
  if count == 1:
    return f'row {listed}'
  return f'rows {listed}' + ('' if count <= len(first) else ', ...')


def representations(h, *, valid=None, what: str = 'representations') -> jax.Array:
  """Checked representations as float32: the one entry check of every statistic.

  Static checks always (:func:`check_matrix`, and ``valid`` by :func:`row_mask`).
  On concrete arrays also the value checks: no NaN or inf, and nothing beyond
  the float32 range before the cast, in the rows ``valid`` keeps (one reduction
  on the device; the rows are looked at on the host only when one is bad).
  Skipped for tracers and for arrays not fully on this process.

  Args:
    h: representations (N, d), any real dtype.
    valid: optional (N,) bool mask of the rows that count.
    what: what they are, for the message.
  Returns:
    ``h`` as a float32 jax array (or tracer).
  Raises:
    InputError: a wrong shape or dtype, a wrong ``valid``, or (concrete arrays) a
      row with NaN/inf or a value beyond float32, with the first rows named.
  """
  h = check_matrix(h, what)
  valid = row_mask(valid, h.shape[0])
  with np.errstate(over='ignore'):
    out = jnp.asarray(h, jnp.float32)
  if _has_values(h) and (valid is None or _has_values(valid)):
    ok = jnp.all(jnp.isfinite(out), axis=-1)
    if valid is not None:
      ok = ok | ~jnp.asarray(valid)
    if not bool(jnp.all(ok)):
      bad = BadRows(what)
      bad.add(np.asarray(h), valid=None if valid is None else np.asarray(valid))
      bad.raise_if_any(h.shape[0])
  return out


def check_representations(h, valid=None, *, what: str = 'representations') -> None:
  """The value checks of representations (NaN, inf, float32 range), also inside ``jax.jit``.

  On concrete arrays it raises :class:`InputError` naming the first bad rows
  (what every statistic does on its own). On tracers it adds a
  ``checkify.check``: wrap the jitted function with
  ``jax.experimental.checkify.checkify`` and call ``error.throw()`` on the
  result to have the check in compiled code (without checkify, tracing a
  function that calls this fails and says so).

  Args:
    h: representations (N, d).
    valid: optional (N,) bool; rows where it is False (padding) are not checked.
    what: what they are, for the message.
  Raises:
    InputError: for concrete inputs, as :func:`representations`.
  """
  if not is_traced(h) and not is_traced(valid):
    representations(h, valid=valid, what=what)
    return
  h = check_matrix(h, what)
  valid = row_mask(valid, h.shape[0])
  ok = jnp.isfinite(h)
  if jnp.issubdtype(h.dtype, jnp.floating) and jnp.finfo(h.dtype).bits > 32:
    ok = ok & (jnp.abs(h) <= FLOAT32_MAX)
  bad = ~jnp.all(ok, axis=-1)
  if valid is not None:
    bad = bad & valid
  checkify.check(~jnp.any(bad), f'{{count}} of {h.shape[0]} rows of the {what} contain NaN, '
                 'inf or values beyond float32 (first: row {first}); Q-Score is undefined '
                 'for them.', count=jnp.sum(bad), first=jnp.argmax(bad))


def check_rows_static(h, valid=None, what: str = 'representations'):
  """Only the static checks of representations and ``valid`` (for counting bad rows).

  Args:
    h: representations (N, d).
    valid: optional (N,) bool.
    what: what they are, for the message.
  Returns:
    ``(h, valid)`` as arrays (``valid`` may be None).
  """
  h = check_matrix(h, what)
  return h, row_mask(valid, h.shape[0])


def row_mask(valid, num_rows: int):
  """Checks a ``valid`` mask: bool, shape (N,) (static checks). None stays None.

  Args:
    valid: None or the mask of rows that count.
    num_rows: N, the number of rows of the representations.
  Returns:
    ``valid`` as an array (or None).
  Raises:
    InputError: not bool, or not of shape (N,) (a length-1 mask would broadcast).
  """
  if valid is None:
    return None
  valid = _as_array(valid)
  if valid.dtype != np.bool_:
    raise InputError(f'valid must be a bool mask of shape ({num_rows},), one entry per row, got '
                     f'dtype {valid.dtype}. Pass e.g. valid=(labels >= 0) or '
                     'mask.astype(bool).')
  if tuple(valid.shape) != (num_rows,):
    raise InputError(f'valid must have shape ({num_rows},), one entry per row of the '
                     f'representations, got shape {tuple(valid.shape)}.')
  return valid


# ------------------------------------------------------------------ the set D and counts

def feature_mask(discriminative, dim: int, what: str = 'the discriminative set D') -> jax.Array:
  """D as a bool mask (d,): a bool mask of length d, or distinct integer indices in [0, d).

  Integer indices are accepted outside a trace only (they are range-checked and
  converted to the mask); inside ``jax.jit`` pass the bool mask.

  Args:
    discriminative: bool (d,) or integer indices (k,).
    dim: d, the number of features of the representations.
    what: what it is, for the message.
  Returns:
    bool (d,) jax array (or the tracer given).
  Raises:
    InputError: a float or count vector, a mask of another length, indices out of
      range or repeated, or traced indices.
  """
  d = _as_array(discriminative)
  hint = ('Pass discriminative_features(counts), or a bool mask of your own '
          f'(shape ({dim},)), or integer feature indices in [0, {dim}).')
  if d.ndim != 1:
    raise InputError(f'{what} must be one-dimensional (a bool mask of shape ({dim},) or a list '
                     f'of feature indices), got shape {tuple(d.shape)}. {hint}')
  if d.dtype == np.bool_:
    if d.shape[0] != dim:
      raise InputError(f'{what} has {d.shape[0]} entries but the representations have '
                       f'd = {dim} features: D must come from representations of the same '
                       'width (the same model and layer). ' + hint)
    return d if is_traced(d) else jnp.asarray(d)
  if d.shape[0] == 0 and not is_traced(d):
    return jnp.zeros(dim, bool)
  if not np.issubdtype(d.dtype, np.integer):
    raise InputError(f'{what} must be a bool mask of shape ({dim},) or integer feature '
                     f'indices, got {d.dtype} values: a float or count vector is not a set of '
                     f'features (casting it to bool would select every non-zero entry). {hint}')
  if is_traced(d):
    raise InputError(f'{what} was given as integer indices inside a traced function (jax.jit, '
                     'vmap, ...), where they cannot be range-checked: pass a bool mask of shape '
                     f'({dim},) there, e.g. made outside with qscore_jax.feature_mask(indices, '
                     f'{dim}).')
  indices = np.asarray(d)
  outside = indices[(indices < 0) | (indices >= dim)]
  if outside.size:
    raise InputError(f'{what}: feature indices must lie in [0, {dim}), got '
                     f'{", ".join(str(int(i)) for i in outside[:ROWS_NAMED])}. {hint}')
  unique, repeats = np.unique(indices, return_counts=True)
  if (repeats > 1).any():
    raise InputError(f'{what}: integer entries are read as feature indices, and index '
                     f'{int(unique[np.argmax(repeats > 1)])} is repeated: this looks like a '
                     'count vector or a 0/1 mask stored as integers, not a set of features. '
                     'Pass a 0/1 mask as mask.astype(bool); ' + hint)
  mask = np.zeros(dim, bool)
  mask[indices] = True
  return jnp.asarray(mask)


def counts(values, what: str = 'activation counts') -> jax.Array:
  """Checked activation counts (or frequencies A_j): shape (d,), real; concrete: finite, >= 0.

  Args:
    values: (d,) counts (int) or frequencies (float).
    what: what they are, for the message.
  Returns:
    float32 (d,) jax array (or tracer).
  Raises:
    InputError: not one-dimensional or not real (static); negative, NaN or inf (concrete).
  """
  array = _as_array(values)
  if array.ndim != 1:
    raise InputError(f'{what} must have shape (d,), one per feature (activation_counts(h) of '
                     f'the reference split), got shape {tuple(array.shape)}. Sum counts over '
                     'chunks first (counts.sum(axis=0)).')
  if not _is_real(array.dtype):
    raise InputError(f'{what} must be integer counts or float frequencies, got dtype '
                     f'{array.dtype}.')
  out = jnp.asarray(array, jnp.float32)
  if _has_values(array) and not bool(jnp.all(jnp.isfinite(out) & (out >= 0))):
    host = np.asarray(array, np.float64)
    bad = np.flatnonzero(~(np.isfinite(host) & (host >= 0)))
    raise InputError(f'{what} must be finite and >= 0 (counts of rows), got '
                     f'{host[bad[0]]} at feature {int(bad[0])} ({len(bad)} such entries).')
  return out


# ------------------------------------------------------------------ options

def _number(value, name: str):
  """``value`` as a Python float, or an InputError naming ``name``."""
  if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
    raise InputError(f'{name} must be a number, got {value!r}.')
  try:
    return float(value)
  except (TypeError, ValueError):
    raise InputError(f'{name} must be a number, got {value!r}.') from None


def check_number(value, name: str, *, minimum: float | None = None,
                 maximum: float | None = None, above: float | None = None,
                 below: float | None = None, integer: bool = False, hint: str = ''):
  """Checks an option: a finite number (an integer with ``integer``) within the given bounds.

  Args:
    value: the option's value.
    name: its name in the message (e.g. ``'eps'``, ``"config field 'num_steps'"``).
    minimum, maximum: inclusive bounds (None: none).
    above, below: exclusive bounds (None: none).
    integer: require a whole number (an ``int``, or a float with no fraction).
    hint: appended to the message (what to do).
  Returns:
    ``value`` unchanged.
  Raises:
    InputError: naming the option, its value and the allowed range.
  """
  number = _number(value, name)
  parts = []
  if above is not None:
    parts.append(f'> {above:g}')
  if minimum is not None:
    parts.append(f'>= {minimum:g}')
  if below is not None:
    parts.append(f'< {below:g}')
  if maximum is not None:
    parts.append(f'<= {maximum:g}')
  wanted = ('an integer' if integer else 'a finite number') + (
      ' ' + ' and '.join(parts) if parts else '')
  ok = (math.isfinite(number) and (not integer or number == int(number))
        and (minimum is None or number >= minimum) and (maximum is None or number <= maximum)
        and (above is None or number > above) and (below is None or number < below))
  if not ok:
    raise InputError(f'{name} must be {wanted}, got {value!r}.' + (f' {hint}' if hint else ''))
  return value


def eps(value, name: str = 'eps'):
  """Checks the highly-active threshold: a finite number > 0 (tracers: a scalar).

  Args:
    value: eps, in per-sample standard deviations.
    name: its name in the message.
  Returns:
    ``value`` unchanged.
  Raises:
    InputError: not a scalar, not finite, or <= 0.
  """
  if is_traced(value):
    if value.ndim:
      raise InputError(f'{name} must be a scalar, got shape {value.shape}.')
    return value
  if isinstance(value, (np.ndarray, jax.Array)) and value.ndim:
    raise InputError(f'{name} must be a scalar, got an array of shape {tuple(value.shape)}.')
  return check_number(value, name, above=0,
                      hint='It is the threshold of L_i in per-sample standard deviations '
                           "(the paper's 4).")


def band(value, name: str = 'band') -> tuple:
  """Checks the percentile band of D: two numbers with 0 <= lo < hi <= 100.

  Args:
    value: ``(lo, hi)``.
    name: its name in the message.
  Returns:
    ``(lo, hi)``: floats when concrete (tracers unchanged).
  Raises:
    InputError: not two numbers, or not 0 <= lo < hi <= 100.
  """
  try:
    lo, hi = value
  except (TypeError, ValueError):
    raise InputError(f'{name} must be two percentiles (lo, hi), got {value!r}.') from None
  if is_traced(lo) or is_traced(hi):
    return lo, hi
  lo, hi = _number(lo, f'{name} lo'), _number(hi, f'{name} hi')
  if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi <= 100):
    raise InputError(f'{name} must be two percentiles with 0 <= lo < hi <= 100, got '
                     f'({lo:g}, {hi:g}). The default is (50, 95).')
  return lo, hi


__all__ = ['BadRows', 'FLOAT32_MAX', 'InputError', 'band', 'check_matrix', 'check_number',
           'check_representations', 'check_rows_static', 'counts', 'eps', 'feature_mask',
           'is_traced', 'representations', 'row_mask']
