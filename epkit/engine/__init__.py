"""epkit's built-in engine (``epkit serve``): a small Qwen3-MoE server with vLLM's flags.

Attention is data-parallel across engine-core processes (one per DP rank); MoE layers are
expert-parallel across the same ranks, with tokens dispatched and combined by the all2all
backend named on the command line. Nothing here is imported by ``import epkit``.

Layout (nano-vllm's split): ``config`` (validated settings), ``sequence``/``block_manager``/
``scheduler`` (pure CPU bookkeeping), ``model``/``moe``/``all2all``/``runner`` (the only
code that touches devices and collectives), ``core`` (one DP rank's loop), ``server``
(OpenAI-compatible HTTP API: ``openai_api``, ``streaming``, ``eplb_export``, ``metrics``) and ``launcher``
(process tree, signals, teardown).
"""
