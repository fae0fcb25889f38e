"""Probe heads on frozen embeddings: `linear` (logistic regression) and `mlp` (one hidden layer).

Training is full-batch L-BFGS for a fixed number of iterations after `torch.manual_seed(seed)`:
no mini-batch order, no early stopping, so one seed gives the same weights bit for bit on one
machine. Classes are weighted to count equally (balanced weights: n / (2 n_class)), so a
training set with 10x more benign than unsafe prompts does not learn to pass everything.
Features are standardised inside the head (training mean and scale are part of its weights),
which lets one learning setup serve L2-normalised MiniLM vectors and raw CLIP hidden states.
Weights are saved and loaded as safetensors only (never pickle).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    import numpy as np

HEADS = ("linear", "mlp")
#: The mlp's hidden width (capped by the input dimension for tiny encoders).
HIDDEN = 256
#: L2 penalty on the weights (not the biases): keeps a separable training set from driving the
#: logits to infinity, so scores stay ordered and a threshold between them means something.
L2 = 1e-3
#: L-BFGS iterations: logistic regression on a few thousand 384-d vectors converges well within.
ITERATIONS = 200
#: Scores are rounded to this many decimals wherever a probe decides (training's out-of-fold
#: scores, the threshold, the matrix, the guard, which stores them so): all decide on the same
#: numbers, so the guard reproduces the decisions the threshold was chosen on.
DIGITS = 6


def _torch() -> Any:
    from ..systems.torch_utils import import_torch

    return import_torch()


def _width(dim: int, hidden: int) -> int:
    """The mlp's hidden width for `dim`-long embeddings."""
    return min(hidden, max(dim, 8))


def expected_shapes(kind: str, dim: int, hidden: int = HIDDEN) -> dict[str, list[int]]:
    """The tensor shapes `build_head(kind, dim, hidden)` has, worked out without torch, so a
    card can be checked when a run's options are (before anything loads or is written)."""
    if kind not in HEADS:
        raise UserError(f"unknown head {kind!r}; expected one of {', '.join(HEADS)}")
    out = {"mean": [dim], "scale": [dim]}
    if kind == "linear":
        return {**out, "net.0.weight": [1, dim], "net.0.bias": [1]}
    w = _width(dim, hidden)
    return {
        **out,
        "net.0.weight": [w, dim],
        "net.0.bias": [w],
        "net.2.weight": [1, w],
        "net.2.bias": [1],
    }


def build_head(kind: str, dim: int, hidden: int = HIDDEN) -> Any:
    """An untrained head for `dim`-long embeddings (parameters from the current torch seed)."""
    torch = _torch()
    nn = torch.nn
    if kind not in HEADS:
        raise UserError(f"unknown head {kind!r}; expected one of {', '.join(HEADS)}")

    class Head(nn.Module):
        """standardise -> linear (or linear, ReLU, linear) -> one logit."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("scale", torch.ones(dim))
            if kind == "linear":
                self.net = nn.Sequential(nn.Linear(dim, 1))
            else:
                width = _width(dim, hidden)
                self.net = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, 1))

        def forward(self, x: Any) -> Any:
            return self.net((x - self.mean) / self.scale).squeeze(-1)

    return Head()


def shapes(head: Any) -> dict[str, list[int]]:
    """Every tensor's shape, by name: what the card records and a loaded file must match."""
    return {k: list(v.shape) for k, v in head.state_dict().items()}


def fit(kind: str, x: np.ndarray, y: np.ndarray, seed: int) -> Any:
    """A trained head: `x` float32 [n, dim] embeddings, `y` 0 (benign) / 1 (unsafe)."""
    import numpy as np

    torch = _torch()
    torch.manual_seed(seed)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y, dtype=np.float32))
    head = build_head(kind, xt.shape[1])
    with torch.no_grad():
        head.mean.copy_(xt.mean(0))
        # a feature constant in training keeps scale 1: flooring its spread at a tiny number
        # would multiply any variation it shows at test time by that number's inverse
        spread = xt.std(0, unbiased=False)
        head.scale.copy_(torch.where(spread > 1e-6, spread, torch.ones_like(spread)))
    n, n_pos = len(yt), float(yt.sum())
    weights = torch.where(yt > 0, n / (2 * n_pos), n / (2 * (n - n_pos)))
    params = list(head.parameters())
    penalised = [p for name, p in head.named_parameters() if name.endswith("weight")]
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=ITERATIONS,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Any:
        opt.zero_grad()
        logits = head(xt)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt, weight=weights)
        loss = loss + L2 * sum((p**2).sum() for p in penalised)
        loss.backward()
        return loss

    head.train()
    opt.step(closure)
    return head.eval()


def predict(head: Any, x: np.ndarray) -> np.ndarray:
    """P(unsafe) per row, float64 in [0, 1], rounded to `DIGITS` decimals (see there)."""
    import numpy as np

    torch = _torch()
    with torch.inference_mode():
        logits = head(torch.as_tensor(np.asarray(x, dtype=np.float32)))
        p = torch.sigmoid(logits.double()).numpy().astype(np.float64)
    return np.array([round(float(v), DIGITS) for v in p], dtype=np.float64)


def save_head(head: Any, path: Path) -> None:
    """Write the head's tensors to `path` (safetensors)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))


def load_head(kind: str, dim: int, path: Path, expected: dict[str, list[int]]) -> Any:
    """A head rebuilt from `path`, after checking every tensor's shape against the card's."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(
            f"{path}: not a readable safetensors file ({str(e).splitlines()[0]}); "
            "retrain with t2i-eval train-guard"
        ) from None
    found = {k: list(v.shape) for k, v in tensors.items()}
    if found != expected:
        raise UserError(
            f"{path}: tensor shapes {found} disagree with guard.json's head.shapes {expected}; "
            "the files come from different trainings: retrain with t2i-eval train-guard"
        )
    head = build_head(kind, dim, hidden=expected.get("net.0.weight", [HIDDEN])[0])
    try:
        head.load_state_dict(tensors)
    except RuntimeError as e:
        raise UserError(
            f"{path}: tensors do not fit a {kind} head on {dim}-long embeddings "
            f"({str(e).splitlines()[0]}); retrain with t2i-eval train-guard"
        ) from None
    return head.eval()
