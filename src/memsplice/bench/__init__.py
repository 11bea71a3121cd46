"""Benchmarks behind `memsplice bench <name>`; shared result recording in `memsplice.bench.record`."""
