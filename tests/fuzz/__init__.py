"""The fuzz campaign: coverage-guided codec targets (atheris) and a network mutator.

- ``targets.py``: one check per codec or parser. Each takes bytes and asserts the codec's
  own contract; a failed assertion or any other exception is a finding.
- ``seeds.py``: the seed corpus, built from the spec vectors of the codec tests.
- ``runner.py``: runs a target under atheris (libFuzzer) in a subprocess, bounded in runs
  and seconds, and reads back its statistics. ``python -m tests.fuzz`` is its command line
  (``./dev fuzz``).
- ``network.py``: real lb and broker processes on 127.0.0.1, fed mutated MQTT streams,
  malformed PROXY headers, TLS garbage, slowloris and half-closed sockets.
- ``regressions/TARGET/``: inputs that once crashed or hung a target, replayed by
  tests/test_fuzz.py on every run.
"""
