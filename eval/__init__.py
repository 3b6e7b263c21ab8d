"""Evaluation of quantized models against their BF16 baseline: perplexity (`eval.ppl`), task accuracy
through lm-evaluation-harness (`eval.tasks`, offline tasks in `eval.local_tasks`), the comparison report
(`eval.report`) and the CLI / Python entry point (`eval.run`, `eval.run.evaluate`).

Import as `from eval import ppl` (a bare `import eval` would shadow the builtin in your namespace).
"""

from wq.threads import configure_openmp

configure_openmp()  # before torch loads: OpenMP threads sleep while they wait (see wq/threads.py)
