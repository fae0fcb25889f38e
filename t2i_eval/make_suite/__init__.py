"""`t2i-eval make-suite`: an over-refusal suite built for a user's own content policy.

Steps (OVERT's generation workflow): generate benign look-alikes (`templates.py` or `llm.py`)
-> drop near-duplicates (`dedup.py`) -> drop what the policy's judge labels otherwise
(`policy_filter.py`) -> keep what a target system refuses (`boundary.py`, optional) -> make
an unsafe twin of kept look-alikes -> the suite and its card (`pipeline.py`, `card.py`).
"""
