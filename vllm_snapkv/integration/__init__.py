"""The vLLM layer: everything that imports, subclasses, replaces or reads a vLLM name.

The rest of the package (settings, methods, selection, schedule, capacity, the step plan and
compaction, the cache layout, the metrics summary) is the pure core: it imports without vLLM, and
``tests/unit/test_boundary.py`` enforces that. Every vLLM name used here is declared in
:mod:`.seam` and checked against the installed vLLM when the plugin is wired into an engine.

Importing this package imports no vLLM; its modules do.
"""
