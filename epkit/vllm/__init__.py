"""What epkit knows about vLLM itself: its releases, its own argument parser, its log lines.

``versions`` is the per-release table (backends, silent replacements, EPLB keys, each with the
wheel line it was read from); ``parse`` is a script run by vLLM's own Python (it imports nothing
from epkit) and ``check`` runs it over rendered commands; ``logs`` reads facts from a vLLM log.
Nothing is imported here, so that ``epkit.topology`` can read the table without a cycle.
"""
