"""RAG mode with real parts: the smoke Qwen2-VL through mlx-vlm, real SQLite, the real daemon on real folders."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import numpy as np
import pytest

from daemon.analysis.critique import DIMENSIONS, critique_schema, profile_schema
from daemon.references.indexer import reference_profile
from daemon.references.sidecar import SidecarInvalid, parse_profile, parse_sidecar
from daemon.pipeline.report import SCHEMA_PATH
from daemon.analysis.retrieval import anchored, distribution, nearest, reference_prior
from tests.harness import Daemon, make_home, mondrian, photo, wait_for
from tests.mlx_reference import mlx_vlm_text

SCHEMA = json.loads(SCHEMA_PATH.read_text())
MAX_PIXELS = 112 * 112


def _scores(base: int, **over: int) -> dict[str, int]:
    return {d: over.get(d, base) for d in DIMENSIONS}


def _sidecar(path: Path, scores: dict[str, int], comments: dict[str, str] | None = None) -> None:
    doc: dict = {"scores": scores}
    if comments:
        doc["comments"] = comments
    path.write_text(json.dumps(doc))


def _age(*paths: Path, seconds: float = 30.0) -> None:
    """Make files look settled (written a while ago), as a curator's existing portfolio would be."""
    t = time.time() - seconds
    for p in paths:
        os.utime(p, (t, t))


def _report(folder: Path) -> dict:
    data = json.loads((folder / "report.json").read_text())
    jsonschema.validate(data, SCHEMA)
    return data


# ------------------------------------------------------------------------------------- pure parts


def test_sidecar_shapes_and_errors() -> None:
    flat = parse_sidecar(_scores(6))
    assert flat == (_scores(6), None)
    flat_with_extras = {**_scores(6), "summary": "Dawn over the dunes.", "overall_grade": 7}
    assert parse_sidecar(flat_with_extras) == (_scores(6), None)  # the docstring's promise, in the flat shape too
    assert parse_profile(flat_with_extras).summary == "Dawn over the dunes."
    assert parse_profile(flat_with_extras).overall_grade == 7
    nested = parse_sidecar({"scores": _scores(7), "comments": {"lighting": "  Zone V\n on the rock. "}})
    assert nested == (_scores(7), {"lighting": "Zone V on the rock."})
    report_like = parse_sidecar({"dimensions": {d: {"score": 5, "comment": f"on {d}"} for d in DIMENSIONS}})
    assert report_like[0] == _scores(5) and report_like[1]["emotional_impact"] == "on emotional_impact"
    with pytest.raises(SidecarInvalid, match="lacks scores for lighting"):
        parse_sidecar({d: 5 for d in DIMENSIONS if d != "lighting"})
    with pytest.raises(SidecarInvalid, match="unknown dimensions colour"):
        parse_sidecar({**_scores(5), "colour": 3})
    with pytest.raises(SidecarInvalid, match="whole numbers from 0 to 10"):
        parse_sidecar(_scores(5, composition=11))
    with pytest.raises(SidecarInvalid, match="whole numbers"):
        parse_sidecar(_scores(5, composition=True))


def _row(name: str, scores: dict[str, int], embedding=None, model_id: str | None = "m") -> SimpleNamespace:
    blob = None if embedding is None else np.asarray(embedding, dtype=np.float32).tobytes()
    return SimpleNamespace(path=f"/refs/{name}", scores=scores, embedding=blob, model_id=model_id, source="human",
                           comments=None, sha256=name)


def test_retrieval_returns_the_nearest_profiles() -> None:
    rows = [_row("dark.jpg", _scores(2)), _row("mid.jpg", _scores(5)), _row("bright.jpg", _scores(9)),
            _row("mixed.jpg", _scores(5, composition=10, lighting=0))]
    got = nearest(_scores(8), rows, k=2)
    assert [n.name for n in got] == ["bright.jpg", "mid.jpg"]
    assert got[0].distance == pytest.approx(np.sqrt(8))
    assert 1 >= got[0].similarity > got[1].similarity >= 0 and got[0].visual_similarity is None
    assert [n.name for n in nearest(_scores(5), rows, k=3)] == ["mid.jpg", "mixed.jpg", "dark.jpg"]
    assert len(nearest(_scores(5), rows, k=10)) == 4

    # Visual similarity breaks a tie in profiles, and outweighs a small profile difference.
    rows = [_row("a.jpg", _scores(5), [1, 0, 0]), _row("b.jpg", _scores(5), [0, 1, 0]),
            _row("c.jpg", _scores(5, lighting=6), [0, 0.1, 1])]
    assert [n.name for n in nearest(_scores(5), rows, k=3)] == ["a.jpg", "b.jpg", "c.jpg"]  # by path on ties
    got = nearest(_scores(5), rows, k=3, embedding=np.array([0, 0.2, 2], np.float32), model_id="m")
    assert [n.name for n in got] == ["c.jpg", "b.jpg", "a.jpg"]
    assert got[0].visual_similarity == pytest.approx(1.0, abs=1e-3)
    # embeddings from another model (or another size) are not comparable: the profile decides
    other = [_row("a.jpg", _scores(5), [1, 0, 0], model_id="other"), _row("b.jpg", _scores(6), [0, 0, 1])]
    got = nearest(_scores(5), other, k=2, embedding=np.array([0, 0, 1], np.float32), model_id="m")
    assert got[0].visual_similarity is None and got[1].visual_similarity == pytest.approx(1.0)

    pf = distribution([_scores(2), _scores(4), _scores(9, lighting=0)])
    assert pf["count"] == 3
    assert pf["dimensions"]["composition"]["mean"] == pytest.approx(5.0)
    assert pf["dimensions"]["composition"]["std"] == pytest.approx(np.std([2, 4, 9]), abs=1e-3)
    assert pf["dimensions"]["lighting"]["mean"] == pytest.approx(2.0)


def test_reference_prior_is_the_curators_scores_weighted_by_similarity() -> None:
    """rag's prior: the retrieved references' curator scores, the more similar weighing more; a reference the
    model scored itself holds the model's own opinion and does not count."""
    rows = [_row("near.jpg", _scores(8)), _row("far.jpg", _scores(2)), _row("model.jpg", _scores(10))]
    rows[2].source = "model"
    found = nearest(_scores(8), rows, k=3)
    sims = {n.name: n.similarity for n in found}
    prior = reference_prior(found)
    want = (8 * sims["near.jpg"] + 2 * sims["far.jpg"]) / (sims["near.jpg"] + sims["far.jpg"])
    assert prior == {d: pytest.approx(want, abs=1e-4) for d in DIMENSIONS} and 5 < want < 8
    assert reference_prior([n for n in found if n.name == "model.jpg"]) is None
    own = _scores(4)
    assert anchored(own, prior, 0.0) == {d: 4.0 for d in DIMENSIONS}
    assert anchored(own, prior, 1.0) == {d: pytest.approx(want, abs=1e-4) for d in DIMENSIONS}
    assert anchored(own, prior, 0.5) == {d: pytest.approx((4 + want) / 2, abs=1e-4) for d in DIMENSIONS}
    assert anchored(own, None, 0.5) == {d: 4.0 for d in DIMENSIONS}


# ------------------------------------------------------------------------------ with the smoke model


@pytest.fixture(scope="module")
def runtime(smoke_model_path: Path):
    from daemon.model.runtime import ModelRuntime

    return ModelRuntime.load(str(smoke_model_path), var_dir=smoke_model_path.parents[1], max_pixels=448 * 448)


@pytest.fixture(scope="module")
def plain_runtime(plain_model_path: Path):
    from daemon.model.runtime import ModelRuntime

    return ModelRuntime.load(str(plain_model_path), var_dir=plain_model_path.parent, max_pixels=448 * 448)


def test_photo_is_encoded_once_for_both_passes(plain_runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second pass reuses the photo and the shared prompt prefix from the first, and writes exactly what
    two independent generations write: on a model whose output depends on the context (`plain_model_path`),
    so a KV cache not cut back to the shared prefix, or decode positions off by any amount, change the text."""
    from PIL import Image

    runtime = plain_runtime

    img = Image.open(Path(__file__).resolve().parent.parent / "samples" / "astronaut.jpg").convert("RGB")
    img = img.resize((448, 448))
    p1, p2 = "You judge prints.\n\nScore the photograph.", "You judge prints.\n\nCritique it, one line each."
    # What mlx-vlm's own generate writes for each prompt alone (a model call of its own, whole prompt each time).
    text1 = mlx_vlm_text(runtime, img, p1, profile_schema(), max_tokens=256)
    text2 = mlx_vlm_text(runtime, img, p2, critique_schema(40), max_tokens=1400)

    vision = type(runtime.model.vision_tower)
    real_call = vision.__call__
    calls = []
    monkeypatch.setattr(vision, "__call__", lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k))
    enc = runtime.encode(img)
    one = runtime.generate_json(img, p1, profile_schema(), max_tokens=256, encoded=enc)
    two = runtime.generate_json(img, p2, critique_schema(40), max_tokens=1400, encoded=enc)
    assert len(calls) == 1, "the vision tower ran more than once"
    assert one.text == text1, "the first pass differs from mlx-vlm's generate"
    assert two.text == text2, "the second pass (on the first one's KV cache) differs from mlx-vlm's generate"
    assert one.reused_tokens == 0 and two.reused_tokens > enc.image_tokens == 256  # image + shared prefix
    assert two.forward_passes < two.generated_tokens  # schema-forced tokens were fast-forwarded
    assert enc.embedding.shape == (runtime.model.config.text_config.hidden_size,)
    assert float(np.linalg.norm(enc.embedding)) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(Exception, match="max_tokens"):
        runtime.generate_json(img, p2, critique_schema(40), max_tokens=5, encoded=enc)


def test_indexing_human_model_idempotent_removal(tmp_path: Path, runtime) -> None:
    from daemon.config import load_config
    from daemon.ledger import Ledger
    from daemon.references.indexer import ReferenceIndexer

    home = make_home(tmp_path / "home", max_pixels=MAX_PIXELS)
    cfg = load_config(home, env={})
    refs = cfg.advisors_dir / "ansel" / "references"
    photo(refs / "moonrise.jpg", seed=1)
    _sidecar(refs / "moonrise.json", _scores(9, lighting=10), {"lighting": "Zone IX on the moon."})
    photo(refs / "dunes.png", seed=2, fmt="PNG")
    photo(refs / "sub" / "valley.jpg", seed=3)
    (refs / "notes.txt").write_text("not a reference")
    (refs / ".DS_Store").write_bytes(b"\0")
    (refs / "broken.jpg").write_text("not a photo")
    photo(refs / "typo.jpg", seed=4)
    (refs / "typo.json").write_text(json.dumps({"scores": {**_scores(5), "colour": 2}}))
    _age(*[p for p in refs.rglob("*") if p.is_file()])
    ledger = Ledger(cfg.db_path)
    loads = []

    def provider():
        loads.append(1)
        return runtime

    ix = ReferenceIndexer(cfg, ledger, provider)
    plan, outcomes = ix.sync(["ansel"])
    rows = {Path(r.path).name: r for r in ledger.references("ansel")}
    assert sorted(rows) == ["dunes.png", "moonrise.jpg", "valley.jpg"]
    assert {(o.path.name, o.action) for o in outcomes} >= {("broken.jpg", "error"), ("moonrise.jpg", "indexed")}
    assert [(a, p.name) for a, p, _ in plan.errors] == [("ansel", "typo.jpg")]
    assert "colour" in plan.errors[0][2]
    human = reference_profile(rows["moonrise.jpg"])
    assert human == {"scores": _scores(9, lighting=10), "comments": {"lighting": "Zone IX on the moon."},
                     "source": "human"}
    for name in ("dunes.png", "valley.jpg"):
        prof = reference_profile(rows[name])
        assert prof["source"] == "model" and prof["comments"] is None and rows[name].model_id == runtime.model_id
        assert set(prof["scores"]) == set(DIMENSIONS) and all(0 <= v <= 10 for v in prof["scores"].values())
    hidden = runtime.model.config.text_config.hidden_size
    assert all(len(r.embedding) == 4 * hidden for r in rows.values())  # pooled vision features, float32
    assert rows["moonrise.jpg"].model_id == runtime.model_id  # whose embedding it is
    assert (cfg.var_dir / "cache" / "reference-thumbs" / f"{rows['dunes.png'].sha256}.jpg").exists()

    # idempotent: nothing to do, nothing rewritten
    before = {r.path: r.indexed_at for r in ledger.references("ansel")}
    plan, outcomes = ReferenceIndexer(cfg, ledger, provider).sync(["ansel"])
    assert plan.unchanged == 3 and [w.path.name for w in plan.index] == ["broken.jpg"]  # still broken: said again
    assert [(o.path.name, o.action) for o in outcomes] == [("broken.jpg", "error")]
    assert {r.path: r.indexed_at for r in ledger.references("ansel")} == before

    # a rename reuses its twin's profile; a new curator sidecar wins over the model; removals drop rows
    shutil.move(refs / "sub" / "valley.jpg", refs / "valley-renamed.jpg")
    _sidecar(refs / "dunes.json", _scores(3))
    (refs / "moonrise.json").unlink()
    _age(refs / "dunes.json", refs / "valley-renamed.jpg")
    ix = ReferenceIndexer(cfg, ledger, provider)
    plan, outcomes = ix.sync(["ansel"])
    actions = {(o.path.name, o.action) for o in outcomes}
    assert ("valley-renamed.jpg", "reused") in actions and ("valley.jpg", "removed") in actions
    rows = {Path(r.path).name: r for r in ledger.references("ansel")}
    assert sorted(rows) == ["dunes.png", "moonrise.jpg", "valley-renamed.jpg"]
    assert reference_profile(rows["dunes.png"])["source"] == "human" and rows["dunes.png"].scores == _scores(3)
    assert reference_profile(rows["moonrise.jpg"])["source"] == "model"

    # a file still being written waits; once settled it is indexed
    photo(refs / "fresh.jpg", seed=5)
    plan = ix.plan(["ansel"], model_id=runtime.model_id)
    assert [p.name for p in plan.waiting] == ["fresh.jpg"] and not plan.index
    _age(refs / "fresh.jpg")
    ix._seen.clear()
    assert [w.path.name for w in ix.plan(["ansel"], model_id=runtime.model_id).index] == ["fresh.jpg"]

    # another model makes model-derived rows stale
    stale = ix.plan(["ansel"], model_id="another model")
    assert {w.path.name for w in stale.index} >= {"moonrise.jpg", "valley-renamed.jpg", "dunes.png"}


def test_rag_anchors_its_scores_to_the_advisors_own(tmp_path: Path, runtime) -> None:
    """Pass 2's scores move towards the curator scores of the retrieved references by rag_reference_weight; the
    report keeps the prior and the model's own scores. A model-scored reference is no prior."""
    import dataclasses

    from daemon.analysis import AnalysisContext
    from daemon.analysis.advisors import get_advisor
    from daemon.analysis.rag import RagStrategy
    from daemon.config import load_config
    from daemon.intake.images import load_photo
    from daemon.ledger import Ledger
    from daemon.references.indexer import ReferenceIndexer

    home = make_home(tmp_path / "home", max_pixels=MAX_PIXELS)
    cfg = load_config(home, env={})
    assert cfg.rag_reference_weight == 0.5  # the default
    refs = cfg.advisors_dir / "ansel" / "references"
    for i, (name, score) in enumerate([("a.jpg", 9), ("b.jpg", 10), ("c.jpg", 9)]):
        photo(refs / name, seed=40 + i)
        _sidecar(refs / name.replace(".jpg", ".json"), _scores(score, composition=0))
    _age(*refs.iterdir())
    ledger = Ledger(cfg.db_path)
    ReferenceIndexer(cfg, ledger, lambda: runtime).sync(["ansel"])
    advisor = get_advisor(cfg, "ansel")
    target = load_photo(photo(tmp_path / "lake.jpg", seed=49), cfg.max_pixels)

    def rag(weight: float) -> Any:
        c = dataclasses.replace(cfg, rag_reference_weight=weight)
        return RagStrategy(c, ledger).analyse(AnalysisContext(runtime=runtime, cfg=c, advisor=advisor, photo=target))

    own = rag(0.0)
    prior = own.extras["reference_prior"]
    assert prior["weight"] == 0.0 and 9 < prior["scores"]["lighting"] < 10 and prior["scores"]["composition"] == 0
    model = {d: own.critique["dimensions"][d]["score"] for d in DIMENSIONS}
    assert prior["model_scores"] == model
    for weight in (1.0, 0.5):
        got = rag(weight)
        assert got.extras["reference_prior"] == {**prior, "weight": weight}
        assert {d: got.critique["dimensions"][d]["score"] for d in DIMENSIONS} == \
            {d: int((1 - weight) * model[d] + weight * prior["scores"][d] + 0.5) for d in DIMENSIONS}
    assert rag(1.0).critique["dimensions"]["composition"]["score"] == 0

    # references the model scored itself are no prior: the model's scores stand
    for side in refs.glob("*.json"):
        side.unlink()
    ReferenceIndexer(cfg, ledger, lambda: runtime).sync(["ansel"])
    assert {r.source for r in ledger.references("ansel")} == {"model"}
    alone = rag(1.0)
    assert "reference_prior" not in alone.extras


def test_a_reference_critiqued_again_is_never_compared_with_itself(tmp_path: Path, runtime) -> None:
    """A photo of the portfolio dropped into the inbox: retrieval leaves it out, so it is not anchored to its own
    curator scores (the answer read off the index). When it is the only reference, nothing is retrieved."""
    import dataclasses

    from daemon.analysis import AnalysisContext
    from daemon.analysis.advisors import get_advisor
    from daemon.analysis.rag import RagStrategy
    from daemon.config import load_config
    from daemon.intake.images import load_photo
    from daemon.ledger import Ledger
    from daemon.references.indexer import ReferenceIndexer

    home = make_home(tmp_path / "home", max_pixels=MAX_PIXELS)
    cfg = dataclasses.replace(load_config(home, env={}), rag_k=3, rag_reference_weight=1.0)
    refs = cfg.advisors_dir / "ansel" / "references"
    photo(refs / "mine.jpg", seed=70)
    _sidecar(refs / "mine.json", _scores(0))
    _age(*refs.iterdir())
    ledger = Ledger(cfg.db_path)
    ReferenceIndexer(cfg, ledger, lambda: runtime).sync(["ansel"])
    advisor = get_advisor(cfg, "ansel")
    same = load_photo(photo(tmp_path / "again.jpg", seed=70), cfg.max_pixels)  # the same bytes, another name

    def rag() -> Any:
        return RagStrategy(cfg, ledger).analyse(AnalysisContext(runtime=runtime, cfg=cfg, advisor=advisor, photo=same))

    alone = rag()
    assert alone.extras["references"] == [] and "reference_prior" not in alone.extras
    assert "portfolio" not in alone.extras  # nor its own scores as "the portfolio" (± 0)

    photo(refs / "other.jpg", seed=71)
    _sidecar(refs / "other.json", _scores(7))
    _age(*refs.iterdir())
    ReferenceIndexer(cfg, ledger, lambda: runtime).sync(["ansel"])
    got = rag()
    assert [r["name"] for r in got.extras["references"]] == ["other.jpg"]
    assert got.extras["reference_prior"]["scores"] == {d: 7.0 for d in DIMENSIONS}
    assert {d: got.critique["dimensions"][d]["score"] for d in DIMENSIONS} == _scores(7)


def test_a_photo_copied_twice_counts_once(tmp_path: Path, runtime, smoke_model_path: Path) -> None:
    """The same bytes under two names are one photo: one retrieval slot, one weight in the portfolio and in the
    prior, one in `references list`'s count and statistics. The index keeps a row per file, and where the copies'
    sidecars differ the first path's scores count, and the list says so."""
    import dataclasses

    from daemon.analysis import AnalysisContext
    from daemon.analysis.advisors import get_advisor
    from daemon.analysis.rag import RagStrategy
    from daemon.config import load_config
    from daemon.intake.images import load_photo
    from daemon.ledger import Ledger
    from daemon.references.indexer import ReferenceIndexer

    home = make_home(tmp_path / "home", max_pixels=MAX_PIXELS)
    cfg = dataclasses.replace(load_config(home, env={}), rag_k=3)  # room for every row: both copies, before the fix
    refs = cfg.advisors_dir / "ansel" / "references"
    photo(refs / "mine" / "dup1.jpg", seed=60)
    shutil.copyfile(refs / "mine" / "dup1.jpg", refs / "mine" / "dup2.jpg")
    _sidecar(refs / "mine" / "dup1.json", _scores(9))
    _sidecar(refs / "mine" / "dup2.json", _scores(1))  # the copy scored otherwise: the first path's scores win
    photo(refs / "link.jpg", seed=61)
    _sidecar(refs / "link.json", _scores(5))
    _age(*[p for p in refs.rglob("*") if p.is_file()])
    ledger = Ledger(cfg.db_path)
    ReferenceIndexer(cfg, ledger, lambda: runtime).sync(["ansel"])
    assert len(ledger.references("ansel")) == 3  # the index stays a faithful list of the files

    target = load_photo(photo(tmp_path / "lake.jpg", seed=69), cfg.max_pixels)
    got = RagStrategy(cfg, ledger).analyse(AnalysisContext(runtime=runtime, cfg=cfg, advisor=get_advisor(cfg, "ansel"),
                                                           photo=target))
    found = {r["name"]: r for r in got.extras["references"]}
    assert len(got.extras["references"]) == 2, [r["name"] for r in got.extras["references"]]
    assert {n: r["scores"] for n, r in found.items()} == {"mine/dup1.jpg": _scores(9), "link.jpg": _scores(5)}
    portfolio = got.extras["portfolio"]
    assert portfolio["count"] == 2 and portfolio["dimensions"]["composition"] == {"mean": 7.0, "std": 2.0}
    sims = {n: r["similarity"] for n, r in found.items()}
    want = (9 * sims["mine/dup1.jpg"] + 5 * sims["link.jpg"]) / (sims["mine/dup1.jpg"] + sims["link.jpg"])
    assert got.extras["reference_prior"]["scores"] == {d: pytest.approx(want, abs=1e-3) for d in DIMENSIONS}

    out = mondrian(home, smoke_model_path, "references", "list", "--advisor", "ansel", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["count"] == 2 and info["files"] == 3 and info["portfolio"] == portfolio
    by_file = {r["file"]: r for r in info["references"]}
    assert by_file["dup1.jpg"]["same_as"] is None and by_file["dup1.jpg"]["counted"] is True
    assert by_file["dup2.jpg"]["same_as"] == "mine/dup1.jpg" and by_file["dup2.jpg"]["counted"] is False
    assert by_file["dup2.jpg"]["profile_used"] == "mine/dup1.jpg"  # its own sidecar's 1s are not used
    text = mondrian(home, smoke_model_path, "references", "list", "--advisor", "ansel").stdout
    assert "ansel: 2 reference(s) (1 more file(s) the same photo as another, counted once)" in text, text
    assert "same photo as mine/dup1.jpg, counted once, with that file's scores" in text, text


def test_references_cli_index_and_list(tmp_path: Path, smoke_model_path: Path) -> None:
    home = make_home(tmp_path / "home", smoke_model_path)
    refs = home / "advisors" / "cartier" / "references"
    photo(refs / "rue.jpg", seed=11)
    _sidecar(refs / "rue.json", _scores(8), {"composition": "The decisive moment."})
    photo(refs / "quai.jpg", seed=12)
    report = refs / "best" / "IMG_9"  # a report folder copied in: its original is a reference, not its previews
    for name, seed in (("IMG_9.jpg", 13), ("preview.jpg", 14), ("thumb.jpg", 15), ("ref-1.jpg", 16)):
        photo(report / name, seed=seed)
    (report / "report.json").write_text(json.dumps({"schema_version": 1, "job_id": 9}))
    _age(*refs.rglob("*"))
    out = mondrian(home, smoke_model_path, "references", "index", "--advisor", "cartier")
    assert out.returncode == 0, out.stderr
    assert "3 indexed, 0 unchanged" in out.stderr, out.stderr
    out = mondrian(home, smoke_model_path, "references", "list", "--advisor", "cartier", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["count"] == 3 and info["portfolio"]["count"] == 3
    assert sorted(r["file"] for r in info["references"]) == ["IMG_9.jpg", "quai.jpg", "rue.jpg"], info
    by_file = {r["file"]: r for r in info["references"]}
    assert by_file["rue.jpg"]["source"] == "human" and by_file["rue.jpg"]["scores"] == _scores(8)
    assert by_file["quai.jpg"]["source"] == "model" and by_file["quai.jpg"]["embedding"] is True
    assert not by_file["rue.jpg"]["path"].startswith("/")  # shown relative to the home
    text = mondrian(home, smoke_model_path, "references", "list").stdout
    assert "cartier: 3 reference(s)" in text and "ansel: 0 reference(s)" in text
    again = mondrian(home, smoke_model_path, "references", "index")
    assert again.returncode == 0 and "0 indexed, 3 unchanged" in again.stderr
    bad = mondrian(home, smoke_model_path, "references", "list", "--advisor", "nobody")
    assert bad.returncode == 2 and "unknown advisor" in bad.stderr


def test_references_list_shows_what_a_references_index_run_skipped(tmp_path: Path, smoke_model_path: Path) -> None:
    home = make_home(tmp_path / "home", smoke_model_path)
    refs = home / "advisors" / "cartier" / "references"
    photo(refs / "rue.jpg", seed=11)
    (refs / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 a card that failed")
    (refs / "zero.jpg").write_bytes(b"")
    _age(*refs.rglob("*"))
    out = mondrian(home, smoke_model_path, "references", "index", "--advisor", "cartier")
    assert out.returncode == 1 and "2 skipped" in out.stderr, out.stderr

    def skipped() -> list[str]:
        listed = mondrian(home, smoke_model_path, "references", "list", "--advisor", "cartier", "--json")
        assert listed.returncode == 0, listed.stderr
        return sorted(e["file"] for e in json.loads(listed.stdout)["skipped"])

    assert skipped() == ["corrupt.jpg", "zero.jpg"]  # not only the daemon's runs are remembered
    assert mondrian(home, smoke_model_path, "references", "index", "--advisor", "ansel").returncode == 0
    assert skipped() == ["corrupt.jpg", "zero.jpg"]  # another advisor's run leaves cartier's alone
    (refs / "corrupt.jpg").unlink()
    assert mondrian(home, smoke_model_path, "references", "index").returncode == 1
    assert skipped() == ["zero.jpg"]  # and a fixed one is no longer listed


def test_rag_through_the_daemon(tmp_path: Path, smoke_model_path: Path) -> None:
    from daemon.ledger import Ledger

    home = make_home(tmp_path / "home", smoke_model_path, default_mode="rag")
    inbox, outbox = home / "inbox", home / "outbox"
    refs = home / "advisors" / "ansel" / "references"
    photo(refs / "moonrise.jpg", seed=21)
    _sidecar(refs / "moonrise.json", _scores(9), {"lighting": "Zone IX on the moon."})
    photo(refs / "dunes.jpg", seed=22)
    photo(refs / "aspens.jpg", seed=23)
    _sidecar(refs / "aspens.json", _scores(4))
    photo(refs / "oak.jpg", seed=24)
    _age(*refs.iterdir())
    photo(inbox / "lake.jpg", seed=25)  # ansel (default advisor), rag (default mode); references indexed at start
    photo(inbox / "cartier" / "street.jpg", seed=26)  # cartier has no references yet: baseline, and why

    with Daemon(home, smoke_model_path) as d:
        wait_for(lambda: (outbox / "lake" / "report.json").exists() and (outbox / "street" / "report.json").exists(),
                 120, what="first reports")
        lake = _report(outbox / "lake")
        assert lake["mode"] == {"requested": "rag", "effective": "rag", "source": "default", "fallbacks": []}
        assert set(lake["profile"]) == set(DIMENSIONS)
        assert lake["portfolio"]["count"] == 4 and set(lake["portfolio"]["dimensions"]) == set(DIMENSIONS)
        # any three of the four hold a curator-scored one (9 or 4): it anchors the scores (the schema checks the block)
        assert lake["reference_prior"]["weight"] == 0.5 and 4 <= lake["reference_prior"]["scores"]["lighting"] <= 9
        assert len(lake["references"]) == 3  # rag_k
        names = {r["name"] for r in lake["references"]}
        assert names <= {"moonrise.jpg", "dunes.jpg", "aspens.jpg", "oak.jpg"}
        sims = [r["similarity"] for r in lake["references"]]
        assert sims == sorted(sims, reverse=True)
        for ref in lake["references"]:
            assert (outbox / "lake" / ref["thumb"]).is_file()
            assert ref["delta"] == {k: lake["dimensions"][k]["score"] - ref["scores"][k] for k in DIMENSIONS}
            assert "visual_similarity" in ref  # embeddings are on by default
        html = (outbox / "lake" / "report.html").read_text()
        assert "Compared with the portfolio" in html and 'src="ref-1.jpg"' in html
        assert lake["timings"]["reused_prompt_tokens"] > 0
        street = _report(outbox / "street")
        assert street["mode"]["effective"] == "baseline" and "references" not in street
        [fb] = street["mode"]["fallbacks"]
        assert fb["from"] == "rag" and "no indexed reference photos for Henri Cartier-Bresson" in fb["reason"]

        # a reference dropped while the daemon runs is indexed between jobs, then used
        ledger = Ledger(home / "var" / "ledger.db")
        new = home / "advisors" / "cartier" / "references" / "gare.jpg"
        photo(tmp_path / "gare.jpg", seed=27)
        _sidecar(tmp_path / "gare.json", _scores(7), {"composition": "A leap over the puddle."})
        new.parent.mkdir(parents=True)
        shutil.copyfile(tmp_path / "gare.json", new.with_suffix(".json"))
        shutil.copyfile(tmp_path / "gare.jpg", new)
        wait_for(lambda: ledger.references("cartier"), 60, what="the new reference indexed")
        photo(inbox / "cartier" / "station.jpg", seed=28)
        wait_for(lambda: (outbox / "station" / "report.json").exists(), 60, what="station report")
        station = _report(outbox / "station")
        assert station["mode"]["effective"] == "rag" and station["portfolio"]["count"] == 1
        [ref] = station["references"]
        assert ref["name"] == "gare.jpg" and ref["source"] == "human" and ref["scores"] == _scores(7)
        assert ref["comment"] == "composition: A leap over the puddle."

        # a removed reference leaves the portfolio
        (refs / "oak.jpg").unlink()
        wait_for(lambda: len(ledger.references("ansel")) == 3, 30, what="the removed reference dropped")
        assert d.proc.poll() is None, d.output()
        assert d.stop() == 0
    assert "reference gare.jpg for cartier indexed" in d.output()


def test_bench_registers_its_benchmarks() -> None:
    from bench.__main__ import available

    assert {"rag", "lora", "baseline"} <= set(available())


def test_rag_with_every_reference_skipped_says_so_instead_of_asking_for_photos(tmp_path: Path,
                                                                                smoke_model_path: Path) -> None:
    """Attack: an advisor whose reference photos were all skipped (damaged copies from a card) fell back to baseline
    "add photos to advisors/cartier/references and run references index": the photos were there, and indexing
    skipped them again. The reason now says they are there and not indexed, and where to read why."""
    home = make_home(tmp_path / "home", smoke_model_path, default_mode="rag", default_advisor="cartier")
    refs = home / "advisors" / "cartier" / "references"
    refs.mkdir(parents=True)
    (refs / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 a card that failed")
    (refs / "corrupt.json").write_text("{}")  # a sidecar is not a photo
    _age(*refs.rglob("*"))
    photo(home / "inbox" / "street.jpg", seed=3)
    out = mondrian(home, smoke_model_path, "run", "--once", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    [fb] = _report(home / "outbox" / "street")["mode"]["fallbacks"]
    assert fb["from"] == "rag" and "the 1 photo(s) in advisors/cartier/references are not indexed yet or were " \
        "skipped" in fb["reason"] and "add photos" not in fb["reason"], fb
    listed = mondrian(home, smoke_model_path, "references", "list", "--advisor", "cartier", "--json")
    assert [e["file"] for e in json.loads(listed.stdout)["skipped"]] == ["corrupt.jpg"], listed.stdout
