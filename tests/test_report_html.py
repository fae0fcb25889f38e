"""The self-contained HTML report (no browser here: structure, files, numbers)."""

import json
import re

import pytest

from t2i_eval.cli import main
from t2i_eval.stats import mcnemar_clustered, mcnemar_exact
from t2i_eval.types import CATEGORIES

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html")
    blocked = tmp / "blocked.yaml"
    blocked.write_text("name: dark-fake\ngenerator: {name: fake, black_words: [blood, naked]}\n")
    a, b = tmp / "a", tmp / "b"
    assert main(["run", "--system", "blocklist>fake", "--out", str(a), "-q"]) == 0
    assert main(["run", "--system", str(blocked), "--out", str(b), "-q"]) == 0
    return tmp, a, b


def _refused_benign(run_dir):
    labels = {
        json.loads(x)["id"]: json.loads(x)["label"]
        for x in (run_dir / "prompts.jsonl").read_text().splitlines()
    }
    verdicts = {
        json.loads(x)["record_id"]: json.loads(x)["flagged"]
        for x in (run_dir / "verdicts" / "blank@2.jsonl").read_text().splitlines()
    }
    out = {}
    for line in (run_dir / "generations" / "rank-0.jsonl").read_text().splitlines():
        g = json.loads(line)
        if labels[g["prompt_id"]] == "benign":
            out[g["record_id"]] = g["status"] == "refused" or bool(verdicts.get(g["record_id"]))
    return out


def test_html_report_is_self_contained_and_complete(two_runs, capsys):
    tmp, a, b = two_runs
    out = tmp / "html"
    assert main(["report", str(a), str(b), "--html", "--html-out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # nothing fetched from a network
    for ref in re.findall(r"src=['\"]([^'\"]+)['\"]", page):
        assert (out / ref).is_file(), ref
    assert page.count("class='per-category'") == 2
    for cat in CATEGORIES:
        assert page.count(f"<td>{cat}</td>") >= 2
    assert "safety-utility score S = 2 * R_u * (1 - R_b)" in page
    assert "FAKE (no model)" in page
    # paired test: benign records refused only by A / only by B, counted independently
    ra, rb = _refused_benign(a), _refused_benign(b)
    only_a = sum(ra[k] and not rb[k] for k in ra)
    only_b = sum(rb[k] and not ra[k] for k in ra)
    assert (
        f"<td>benign</td><td>{len(ra)}</td><td>{only_a}</td><td>{only_b}</td>"
        f"<td>{mcnemar_exact(only_a, only_b):.3g}</td>"
    ) in page
    # the gallery shows the blacked-out benign images of run B (the second run) as thumbnails
    thumbs = re.findall(r"src=\"images/run-(\d+)/([0-9a-f]+)\.png\"", page)
    assert thumbs and all(run == "1" and rb[t] for run, t in thumbs)  # only refused benign
    assert all((out / "images" / f"run-{run}" / f"{t}.png").is_file() for run, t in thumbs)


def test_single_run_html_goes_beside_the_report(two_runs):
    _, a, _ = two_runs
    assert main(["report", str(a), "--html"]) == 0
    page = (a / "report" / "html" / "index.html").read_text()
    assert "Leaderboard" not in page and "class='per-category'" in page


def test_paired_test_with_several_seeds_is_clustered_by_prompt(tmp_path):
    # the blocklist refuses a prompt on every seed: each refused prompt is one piece of
    # evidence, not `seeds` of them, so the clustered test (prompts as clusters) is used
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", "--system", "blocklist>fake", "--seeds", "2", "--out", str(a), "-q"]) == 0
    assert main(["run", "--system", "fake", "--seeds", "2", "--out", str(b), "-q"]) == 0
    out = tmp_path / "html"
    assert main(["report", str(a), str(b), "--html", "--html-out", str(out)]) == 0
    page = (out / "index.html").read_text()
    ra, rb = _refused_benign(a), _refused_benign(b)
    prompt_of = {
        json.loads(x)["record_id"]: json.loads(x)["prompt_id"]
        for x in (a / "generations" / "rank-0.jsonl").read_text().splitlines()
    }
    clusters: dict[str, list[int]] = {}
    for rid in ra:
        c = clusters.setdefault(prompt_of[rid], [0, 0])
        c[0] += ra[rid] and not rb[rid]
        c[1] += rb[rid] and not ra[rid]
    only_a = sum(c[0] for c in clusters.values())
    only_b = sum(c[1] for c in clusters.values())
    assert only_a > 0 and all(c[0] in (0, 2) for c in clusters.values())  # seeds agree
    p = mcnemar_clustered([tuple(c) for c in clusters.values()])
    assert (
        f"<td>benign</td><td>{len(ra)}</td><td>{only_a}</td><td>{only_b}</td>"
        f"<td>{p:.3g} (clustered)</td>"
    ) in page
    assert p > mcnemar_exact(only_a, only_b)  # the per-seed count overstated the evidence


def test_outcome_bars_count_every_counted_record_once_by_its_cause(two_runs):
    from t2i_eval.report.html import COLOURS, OUTCOMES, _outcome_counts
    from t2i_eval.store import read_run
    from t2i_eval.types import LABELS

    _, _, b = two_runs  # a fake generator that blacks out some images: blank refusals
    data = read_run(b)
    label = {p.id: p.label for p in data.prompts}
    blanks = 0
    for lab in LABELS:
        counts = _outcome_counts(data, lab)
        counted = [
            (o, cause)
            for rid, (o, cause) in data.outcomes.items()
            if o.counted and label[data.gens[rid].prompt_id] == lab
        ]
        assert sum(sum(c.values()) for c in counts.values()) == len(counted)
        blank = sum(cause == "blank" for _, cause in counted)
        assert sum(c["blank"] for c in counts.values()) == blank
        blanks += blank
    assert blanks > 0 and all(set(c) == set(OUTCOMES) for c in counts.values())
    assert set(COLOURS) == set(OUTCOMES)  # today's segments each have their own colour
