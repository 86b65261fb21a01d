"""The machinery behind the public projections (internal; no stable API).

- :mod:`.rows`: attention rows from queries and keys (the one implementation of scaling, padding,
  causal masking and grouped-query heads).
- :mod:`.validation`: checks on every tensor entering the projections and the kernels.
- :mod:`.backends`: the registry of backends (``torch``, ``numba``, ``triton``).
- :mod:`.driver`, :mod:`.layout`: rows flattened and grouped by value space, solved in chunks.
- :mod:`.grouped`: per-group products; :mod:`.certify`: the certificate's measures;
  :mod:`.threads`: how many threads a solve may use.
"""
