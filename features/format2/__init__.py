"""Store format 2 (written by this penult): a small top-level HDF5 file over immutable segment
files in ``STORE.segments/``.

- ``state.py``: the top-level file (piece maps, names, fingerprints, the view and its links)
  and what it says, in memory;
- ``commit.py``: the write side, journal shards replayed into new segments and published;
- ``files.py``: one segment file (write, read, verify) and the sorted path-key runs;
- ``backend.py``: the read side behind ``FeatureStore``, and the check and repair of segments.
"""
