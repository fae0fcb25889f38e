"""Prompt rewriting as a mitigation for over-refusal.

- `rewriters`: the rewriters (rule, llm) and the cache of their rewrites (Suite -> Suite, every
  rewrite keeping its `parent_id`);
- `experiment`: `t2i-eval rewrite`: rewrite a run's prompts, run them through the same system
  into a linked run, and measure before/after (`report.rewrite` writes it up).

Nothing is imported here, so importing the rewriters never starts the runner.
"""
