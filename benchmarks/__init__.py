"""weft's benchmarks: each manager beside its raw backend, same handler, same load.

Run ``python -m benchmarks run`` from the repository root (``--quick`` for a smoke
run of about two minutes). See ``docs/performance.md`` for what is measured, how,
and what limits each figure. Nothing here installs anything; the keep-alive and
churn figures need Debian's ``wrk`` (``apt-get install wrk``).

Layout:

- :mod:`benchmarks.handlers`: the HTTP responder and echo handler, once per handler
  kind (sync socket, trio stream), plus the asyncio reference;
- :mod:`benchmarks.server`: one server in its own process (weft or raw backend);
- :mod:`benchmarks.idleclient`: a process holding many idle connections;
- :mod:`benchmarks.procs`: starting and talking to those processes, CPU pinning;
- :mod:`benchmarks.wrk`: running ``wrk`` and parsing its output;
- :mod:`benchmarks.suites`: the measurements (throughput, churn, idle, stop, workers);
- :mod:`benchmarks.workers`: ``weft serve --workers N`` processes, pinned per worker;
- :mod:`benchmarks.report`: machine description, Markdown table, JSON, plot;
- :mod:`benchmarks.profile`: ``python -m benchmarks profile``, py-spy on a weft server.
"""
