"""Cross-validation folds that keep related prompts together, shared by `train.train_probe`
(the out-of-fold scores that set the operating threshold and the card's CV metrics) and
`loso` (in-distribution cross-validation inside a source).

Related prompts: benign/unsafe twins (one `pair_id`) and a prompt made from another (its
`parent_id`, e.g. a counterexample made from a training prompt). If they landed in different
folds, a held-out prompt would be scored by a head that trained on its near copy, and the
out-of-fold numbers (and the threshold chosen on them) would be optimistic.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..types import Prompt


def groups_of(prompts: Sequence[Prompt]) -> list[list[int]]:
    """Indices of `prompts` joined into groups: a prompt joins its twins (`pair_id`) and its
    parent (`parent_id`, when the parent is among `prompts` or shares a parent with it),
    transitively. Groups are in order of their first prompt."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def join(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    for p in prompts:
        node = f"id:{p.id}"
        find(node)
        if p.pair_id:
            join(node, f"pair:{p.pair_id}")
        if p.parent_id:
            join(node, f"id:{p.parent_id}")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(find(f"id:{p.id}"), []).append(i)
    return list(groups.values())


def folds_of(prompts: Sequence[Prompt], k: int, seed: int) -> list[int]:
    """The fold (0..k-1) of each prompt: related prompts (`groups_of`) share a fold, so no
    prompt is scored by a head trained on its twin or its parent; groups are stratified by
    their labels (benign only, unsafe only, both) and dealt round-robin after a shuffle by
    `seed`, so the folds are deterministic and balanced. With at least 2 groups holding each
    label and k >= 2, every fold's complement holds both labels (the kinds that hold a label
    are dealt one after the other)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, found {k}")
    kinds: dict[str, list[list[int]]] = {}
    for idx in groups_of(prompts):
        kind = "+".join(sorted({prompts[i].label for i in idx}))
        kinds.setdefault(kind, []).append(idx)
    rng = random.Random(seed)
    fold = [0] * len(prompts)
    dealt = 0
    for kind in sorted(kinds):
        members = kinds[kind]
        rng.shuffle(members)
        for idx in members:
            for i in idx:
                fold[i] = dealt % k
            dealt += 1
    return fold


def label_groups(prompts: Sequence[Prompt], label: str) -> int:
    """How many groups (`groups_of`) hold at least one prompt with `label`: the most folds
    that can each leave that label in training."""
    return sum(any(prompts[i].label == label for i in idx) for idx in groups_of(prompts))
