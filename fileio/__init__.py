"""File I/O of every package, imports nothing else of the project (the bottom layer, beside gdf).

* :mod:`fileio.errors`: ``CheckpointError`` (a model or state file is missing, unreadable or cannot
  be written) and ``WriteError`` (an OS reason: disk full, read-only, permissions; one line with a fix).
* :mod:`fileio.atomic`: crash-safe writes (temp file beside the target, fsync, rename, folder fsync),
  the OS error behind an exception (:func:`fileio.atomic.os_error_of`).
* :mod:`fileio.state_dicts`: flat state dicts: ``read_state_dict`` (.safetensors / .pt / .ckpt),
  shapes from a safetensors header, ``save_safetensors`` (atomic); both refuse a NaN or an infinity.
* :mod:`fileio.finite`: the one finiteness check of weights (``first_nonfinite_tensor``, ``check_finite``).
"""
