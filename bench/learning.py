"""`learning`: what an adapter learns from N photos, against rag and the bare model (the learning curve).

A synthetic advisor whose taste is visible in the pixels (bench/synthetic.py): lighting is the brightness
decile of the top band, colour harmony the saturation decile of the bottom band, and visual balance how
close to the centre a dark bar stands (a whole-image rule: no patch alone tells it); every other dimension is
5. The advisor's portfolio grows N = 10, 25, 50 (nested: the 25 include the 10); a fixed test set of 30
other photos scores every mode. For each N:

  baseline  the base model with the advisor's prompt (does not depend on N: measured once)
  rag       the rag strategy over the N references (indexed with their vision features), its scores anchored
            to the retrieved references' curator scores as the product anchors them (`rag_reference_weight`,
            default 0.5: pass 2's expected scores blended with the similarity-weighted mean of the neighbours')
  lora      an adapter trained as `mondrian train` trains (curator targets, the same dataset rows, samples
            checked, early stopping on a validation split carved from the N), evaluated on the test set

Scores are read as `mondrian evaluate` reads them (probability-weighted expectation over the score tokens).
Figures, as key=value lines: `learning_srcc_<mode>_n<N>` (mean Spearman over the three taste dimensions),
`learning_srcc_<mode>_n<N>_<dim>`, `learning_mae_<mode>_n<N>` (mean over all 8 dimensions) and
`learning_mae_<mode>_n<N>_<dim>`. Also writes `learning.json` and `learning.png` (the curve) into --out.

The base is the smoke architecture with plain random weights (tests/lora_helpers: the smoke model's tied
digit rows cannot learn scores). Flags (after the name): --ns 10,25,50 --test 30 --steps 160 --batch 4 --out DIR
--modes baseline,rag,lora (e.g. `--ns 25 --modes lora`: a reduced run that tries a training change)
--balance centre|centre-vertical|two-masses (which whole-image rule; RESULTS.md says what each gave)
--base plain|perception (plain random weights, or first trained on generic captions: bench/perception.py)
--seeds 0,1,2,3,4 (the whole run once per seed: each draws its own portfolio and test set and trains with that
seed, under --out/seed-<s>/; figures get a `_seed<s>` suffix, and `learning_<a>_minus_<b>_srcc_n<N>` becomes the
mean over the seeds with a 95 % interval, `..._lo`/`..._hi`, from a paired bootstrap over the test photos
resampled within each seed; `..._seed_lo`/`..._seed_hi` is the t interval over the seeds' own differences).
--reuse (with --seeds: a seed already finished under --out at the same settings, on weights with the same sha256,
is read back instead of run again: resume a run, or split the seeds over processes and summarise them together).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from . import emit, note, var_dir
from .synthetic import BALANCE_RULES

TASTE = ("lighting", "color_harmony", "visual_balance")
ADVISOR = "synth"
MAX_PIXELS = 112 * 112
SETTINGS = {"embeddings_enabled": True, "max_pixels": MAX_PIXELS, "comment_max_chars": 24, "max_tokens": 700}
MODES = ("baseline", "rag", "lora")
ACCEPTS_ARGS = True  # bench/__main__.py passes the flags after the name


def _options(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench learning")
    p.add_argument("--ns", default="10,25,50", help="portfolio sizes, comma-separated (default 10,25,50)")
    p.add_argument("--test", type=int, default=30, help="fixed test photos (default 30)")
    p.add_argument("--steps", type=int, default=160, help="LoRA training steps per N (default 160)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=4,
                   help="LoRA batch size (default 4): fixed, so every seed trains on as many rows (steps x batch)")
    p.add_argument("--variants", type=int, default=2, help="augmented copies per training reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", help="several seeds, comma-separated (e.g. 0,1,2,3,4): the run once per seed, and the "
                                   "mean differences over them with 95 %% intervals (default: --seed alone)")
    p.add_argument("--reuse", action="store_true",
                   help="with --seeds: keep a seed's finished run under --out when its settings and the base's "
                        "weights (sha256) are the same, so an interrupted run resumes and runs split over several "
                        "processes or machines are summarised together")
    p.add_argument("--balance", choices=BALANCE_RULES, default="centre",
                   help="the whole-image rule (bench/synthetic.py draw_taste; default centre)")
    p.add_argument("--base", choices=("plain", "perception"), default="plain",
                   help="plain random weights (default), or those first trained on generic captions "
                        "(bench/perception.py: a small stand-in for a pretrained model)")
    p.add_argument("--modes", default=",".join(MODES),
                   help="which modes to measure, comma-separated (default baseline,rag,lora; e.g. lora alone)")
    p.add_argument("--out", help="where learning.json and learning.png go (default <var>/bench-learning)")
    opts = p.parse_args(argv or [])
    unknown = set(opts.modes.split(",")) - set(MODES)
    if unknown:
        p.error(f"--modes: unknown {', '.join(sorted(unknown))}; choose among {','.join(MODES)}")
    if opts.batch < 1:
        p.error(f"--batch {opts.batch}: a batch holds at least one row (the default is 4)")
    return opts


def _write_advisor(home: Path, photos: list[tuple[Path, dict[str, int]]]) -> None:
    folder = home / "advisors" / ADVISOR
    refs = folder / "references"
    refs.mkdir(parents=True, exist_ok=True)
    (folder / "advisor.toml").write_text(f'id = "{ADVISOR}"\nname = "Synth"\n'
                                         'prompt = "You judge light, colour and balance."\nflip_augmentation = true\n')
    old = time.time() - 120  # settled: the indexer waits for files still being written
    for src, scores in photos:
        dst = refs / src.name
        shutil.copyfile(src, dst)
        dst.with_suffix(".json").write_text(json.dumps({"scores": scores}))
        for p in (dst, dst.with_suffix(".json")):
            os.utime(p, (old, old))


def _pool(folder: Path, n: int, seed: int, prefix: str, balance: str) -> list[tuple[Path, dict[str, int]]]:
    import numpy as np

    from .synthetic import draw_taste, synthetic_photo

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scores, draw = draw_taste(rng, balance)
        path = synthetic_photo(folder / f"{prefix}{i:03d}.png", draw.pop("value"), draw.pop("saturation"),
                               seed * 1000 + i, **draw)
        out.append((path, scores))
    return out


def _figures(ev: dict[str, Any]) -> dict[str, Any]:
    """Mean Spearman over the taste dimensions, mean MAE over all eight, and both per taste dimension."""
    from jobs.evaluate import spearman_mean

    ok = [p for p in ev["photos"] if p["expected"] is not None]
    pred = [[p["expected"][d] for d in TASTE] for p in ok]
    true = [[p["target"][d] for d in TASTE] for p in ok]
    out = {"srcc": spearman_mean(pred, true), "mae": ev["mae_mean"], "valid": f"{ev['valid']}/{ev['n']}",
           "_rows": {p["sha256"]: ([p["expected"][d] for d in TASTE], [p["target"][d] for d in TASTE]) for p in ok}}
    for d in TASTE:
        out[f"srcc_{d}"] = ev["per_dim"][d]["spearman"] or 0.0
        out[f"mae_{d}"] = ev["per_dim"][d]["mae"]
    return out


class _Recording:
    """The runtime, remembering the prompt and text of the last report it wrote (rag's second pass)."""

    def __init__(self, runtime: Any) -> None:
        self._rt = runtime
        self.last: tuple[str, str] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rt, name)

    def generate_json(self, image: Any, prompt: str, schema: dict, **kw: Any) -> Any:
        gen = self._rt.generate_json(image, prompt, schema, **kw)
        self.last = (prompt, gen.text)
        return gen


def _rag(cfg: Any, runtime: Any, ledger: Any, advisor: Any, test: list[Any]) -> dict[str, Any]:
    from daemon.analysis import AnalysisContext
    from daemon.analysis.rag import RagStrategy
    from daemon.analysis.retrieval import anchored
    from daemon.intake.images import load_photo
    from jobs.evaluate import Evaluation, PhotoScores

    strategy = RagStrategy(cfg, ledger)
    rec = _Recording(runtime)
    result = Evaluation(label="rag")
    for ref in test:
        photo = load_photo(Path(ref.path), cfg.max_pixels)
        done = strategy.analyse(AnalysisContext(runtime=rec, cfg=cfg, advisor=advisor, photo=photo))
        prompt, text = rec.last  # type: ignore[misc]
        expected = runtime.expected_scores(photo.image, prompt, text)  # pass 2's own scores, as expectations
        prior = done.extras.get("reference_prior")  # then anchored as rag anchors its integers
        if prior is not None:
            expected = anchored(expected, prior["scores"], prior["weight"])
        result.photos.append(PhotoScores(ref.sha256, expected, None, dict(ref.scores)))
    return result.to_dict()


def _lora(cfg: Any, model_path: Path, advisor: Any, refs: list[Any], test: list[Any], opts: argparse.Namespace,
          work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from daemon.model.fitting import FitSettings, fit_lora
    from daemon.model.runtime import ModelRuntime
    from jobs import dataset as ds
    from jobs.evaluate import evaluate, readable
    from daemon.analysis.prompts import critique_prompt

    # Validation (early stopping) is carved from the N by content hash; the test set is the fixed one.
    inner = ds.split(refs, holdout_fraction=0.0, validation_fraction=0.2)
    splits = ds.Splits(train=inner.train + inner.test, validation=inner.validation, test=test)
    built = ds.build_dataset(cfg, advisor, refs, work / "dataset",
                             ds.DatasetSettings(variants=opts.variants, exposure=False), splits=splits)
    runtime = ModelRuntime.load(str(model_path), var_dir=cfg.var_dir, max_pixels=cfg.max_pixels)
    data = ds.load_built(built.path)
    # The batch is fixed, not capped at the validation split's size (fit_lora repeats a smaller split up to a
    # batch): capped, a seed whose hash-carved split held one photo trained on a quarter of the rows.
    fit = FitSettings(steps=opts.steps, learning_rate=opts.lr, batch_size=opts.batch,
                      eval_every=40, patience=3, seed=opts.seed)
    fitted = fit_lora(runtime, data["train"], data["validation"], fit, scratch=work / "scratch.safetensors",
                      on_progress=lambda e: None)
    folder = fitted.save(work / "adapter")
    ev = evaluate(runtime, readable(test, cfg.max_pixels)[0], critique_prompt(advisor), adapter=folder, label="lora",
                  comment_max_chars=cfg.comment_max_chars, max_tokens=cfg.max_tokens)
    (work / "evaluation.json").write_text(json.dumps(ev.to_dict(), default=str))  # per photo, for a closer look
    return ev.to_dict(), fitted.metrics


def _plot(results: dict[str, Any], ns: list[int], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note("matplotlib is not installed (pip install 'mondrian[bench]'): no learning.png")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("baseline", "k--"), ("rag", "b-o"), ("lora", "r-o")):
        srcc = [results[str(n)][mode]["srcc"] or 0.0 for n in ns]
        mae = [results[str(n)][mode]["mae"] for n in ns]
        axes[0].plot(ns, srcc, style, label=mode)
        axes[1].plot(ns, mae, style, label=mode)
    axes[0].set(xlabel="training references N", ylabel="mean Spearman (lighting, colour, balance)",
                title="Ranks like the advisor (higher is better)")
    axes[1].set(xlabel="training references N", ylabel="mean MAE (8 dimensions)",
                title="Scores like the advisor (lower is better)")
    for ax in axes:
        ax.set_xticks(ns)
        ax.grid(alpha=0.3)
        ax.legend()
    base = ("smoke-sized base pretrained on generic captions (bench/perception.py)"
            if results.get("settings", {}).get("base") == "perception" else "smoke-sized random base model")
    fig.suptitle(f"Synthetic advisor, fixed test set of {results['test']} photos, {base}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(size: str, argv: list[str] | None = None) -> dict[str, Any]:
    from daemon.model.smoke import ensure_smoke_model

    from .synthetic import plain_random_model

    opts = _options(argv)
    ns = sorted(int(x) for x in opts.ns.split(","))
    modes = [m for m in MODES if m in opts.modes.split(",")]
    root = var_dir()
    out = Path(opts.out) if opts.out else root / "bench-learning"
    model_path = plain_random_model(ensure_smoke_model(root), root / "models" / "smoke-plain")
    if opts.base == "perception":
        from .perception import perception_model

        model_path = perception_model(model_path, root / "models" / "smoke-perception", log=note)
    labels = (f"ns={opts.ns} test={opts.test} steps={opts.steps} lr={opts.lr:g} batch={opts.batch} "
              f"variants={opts.variants}")
    labels += "" if len(modes) == len(MODES) else f" modes={'+'.join(modes)}"
    labels += "" if opts.balance == "centre" else f" balance={opts.balance}"
    labels += "" if opts.base == "plain" else f" base={opts.base}"
    mid = 25 if 25 in ns else ns[len(ns) // 2]
    if opts.seeds:
        return _seeds(opts, ns, modes, out, model_path, labels, mid)
    note(f"learning: {labels} on {model_path.name}")
    results, _ = _measure(opts, ns, modes, out, model_path)
    png = _plot(results, ns, out / "learning.png") if len(modes) == len(MODES) else None
    figures: dict[str, Any] = {"learning_settings": labels.replace(" ", ","),
                               "learning_json": str(out / "learning.json")}
    if png:
        figures["learning_png"] = str(png)
    r = results[str(mid)]
    for a, b in (("lora", "rag"), ("rag", "baseline")):
        if a in r and b in r:
            figures[f"learning_{a}_minus_{b}_srcc_n{mid}"] = round((r[a]["srcc"] or 0) - (r[b]["srcc"] or 0), 3)
    return figures


def _measure(opts: argparse.Namespace, ns: list[int], modes: list[str], out: Path, model_path: Path,
             suffix: str = "") -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """One seed's run (opts.seed): the figures by N (also written to out/learning.json, and printed with `suffix`),
    and each mode's per-photo rows by N (sha256 -> (predicted, true) over the taste dimensions)."""
    from daemon.analysis.advisors import get_advisor
    from daemon.analysis.prompts import critique_prompt
    from daemon.config import load_config
    from daemon.ledger import Ledger
    from daemon.model.runtime import ModelRuntime
    from daemon.references.indexer import ReferenceIndexer
    from jobs import dataset as ds
    from jobs.evaluate import evaluate, readable

    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pool = _pool(work / "pool", max(ns), opts.seed, "r", opts.balance)
    test_photos = _pool(work / "test", opts.test, opts.seed + 7, "t", opts.balance)
    test = [ds.Reference(path=str(p), sha256=hashlib.sha256(p.read_bytes()).hexdigest(), scores=s, source="human")
            for p, s in test_photos]

    results: dict[str, Any] = {"settings": vars(opts), "test": opts.test, "model": str(model_path),
                               "model_sha256": weights_sha256(model_path)}
    rows: dict[str, dict[str, Any]] = {}
    base_figs: dict[str, Any] | None = None
    for n in ns:
        started = time.perf_counter()
        home = work / f"n{n}"
        (home / "inbox").mkdir(parents=True)
        (home / "mondrian.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in SETTINGS.items()))
        _write_advisor(home, pool[:n])
        cfg = load_config(home, env={}, model=str(model_path))
        runtime = ModelRuntime.load(str(model_path), var_dir=cfg.var_dir, max_pixels=cfg.max_pixels)
        ledger = Ledger(cfg.db_path)
        ReferenceIndexer(cfg, ledger, lambda: runtime).sync([ADVISOR])
        refs = ds.collect_references(cfg, ADVISOR, ledger)
        assert len(refs) == n and all(r.source == "human" for r in refs), "the portfolio was not indexed"
        advisor = get_advisor(cfg, ADVISOR)
        figs: dict[str, Any] = {}
        if "baseline" in modes:
            if base_figs is None:
                base = evaluate(runtime, readable(test, cfg.max_pixels)[0], critique_prompt(advisor), adapter=None,
                                label="base", comment_max_chars=cfg.comment_max_chars,
                                max_tokens=cfg.max_tokens).to_dict()
                base_figs = _figures(base)
            figs["baseline"] = base_figs
        if "rag" in modes:
            figs["rag"] = _figures(_rag(cfg, runtime, ledger, advisor, test))
        training = ""
        if "lora" in modes:
            lora_ev, fit = _lora(cfg, model_path, advisor, refs, test, opts, home / "lora")
            figs["lora"] = _figures(lora_ev)
            training = (f" (lora: {fit['steps_run']} steps, best at {fit['best_step']}, {fit['train_rows']} "
                        f"training rows)")
        rows[str(n)] = {mode: f["_rows"] for mode, f in figs.items()}
        figs = {mode: {k: v for k, v in f.items() if k != "_rows"} for mode, f in figs.items()}
        results[str(n)] = dict(figs)
        if "lora" in modes:
            results[str(n)]["training"] = {k: fit[k] for k in (
                "steps_run", "batch_size", "best_step", "best_val_loss", "initial_val_loss", "train_rows",
                "validation_rows", "samples", "history")}
        _emit_n(n, figs, suffix)
        note(f"learning n={n}{suffix}: {time.perf_counter() - started:.0f} s{training}")
        json.dump(results, open(out / "learning.json", "w"), indent=2, default=str)
    return results, rows


def _emit_n(n: int, figs: dict[str, Any], suffix: str) -> None:
    """One N's figures per mode, as printed while a seed runs (and again for a seed read back by --reuse)."""
    for mode, f in figs.items():
        if mode == "training":
            continue
        emit(f"learning_srcc_{mode}_n{n}{suffix}", round(f["srcc"] or 0.0, 3))
        emit(f"learning_mae_{mode}_n{n}{suffix}", round(f["mae"], 3))
        for d in TASTE:
            emit(f"learning_srcc_{mode}_n{n}_{d}{suffix}", round(f[f"srcc_{d}"], 3))
            emit(f"learning_mae_{mode}_n{n}_{d}{suffix}", round(f[f"mae_{d}"], 3))


PAIRS = (("lora", "rag"), ("rag", "baseline"))
# What makes two runs of one seed the same measurement; --seeds, --reuse and --out only say how runs are organised.
SAME_RUN = ("ns", "test", "steps", "lr", "batch", "variants", "seed", "balance", "base", "modes")


def weights_sha256(model_path: Path) -> str:
    """The base's weights, hashed: a rebuilt base keeps its path but not its weights (RESULTS.md, `learning`)."""
    digest = hashlib.sha256()
    for f in sorted(model_path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _finished(folder: Path, opts: argparse.Namespace, model_path: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A seed's earlier run under `folder` at the same settings on the same weights, or None."""
    try:
        results = json.loads((folder / "learning.json").read_text())
        rows = json.loads((folder / "rows.json").read_text())
    except (OSError, ValueError):
        return None
    want = {k: vars(opts)[k] for k in SAME_RUN}
    if ({k: results.get("settings", {}).get(k) for k in SAME_RUN} != want
            or results.get("model_sha256") != weights_sha256(model_path)):
        return None
    return results, rows


def _seeds(opts: argparse.Namespace, ns: list[int], modes: list[str], out: Path, model_path: Path, labels: str,
           mid: int, replicates: int = 2000) -> dict[str, Any]:
    """The run once per seed (--seeds), then at N = `mid` the mean over seeds of each pair's SRCC difference with
    two 95 % intervals: a paired bootstrap over the test photos, resampled within each seed (both modes of a pair
    see the same resampled photos; the statistic is the mean over seeds of the difference, as measured), and a t
    interval over the seeds' differences (which also sees what training and portfolio vary between seeds)."""
    import numpy as np
    from scipy import stats

    from jobs.evaluate import spearman_mean

    seeds = [int(x) for x in opts.seeds.split(",")]
    labels += f" seeds={'+'.join(map(str, seeds))}"
    note(f"learning: {labels} on {model_path.name}")
    per_seed: dict[str, Any] = {}
    rows: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        started = time.perf_counter()
        one = argparse.Namespace(**{**vars(opts), "seed": seed})
        done = _finished(out / f"seed-{seed}", one, model_path) if opts.reuse else None
        if done:
            per_seed[str(seed)], rows[seed] = done
            for n in ns:
                _emit_n(n, done[0][str(n)], f"_seed{seed}")
            note(f"learning seed {seed}: reused the finished run in {out / f'seed-{seed}'}")
            continue
        per_seed[str(seed)], rows[seed] = _measure(one, ns, modes, out / f"seed-{seed}", model_path, f"_seed{seed}")
        (out / f"seed-{seed}" / "rows.json").write_text(json.dumps(rows[seed]))  # per photo: (predicted, true)
        note(f"learning seed {seed}: {time.perf_counter() - started:.0f} s")
    summary: dict[str, Any] = {"settings": {**vars(opts), "labels": labels}, "seeds": seeds, "n": mid,
                               "interval": f"95 %: paired bootstrap over the test photos within each seed "
                                           f"({replicates} replicates), and a t interval over the seeds"}
    figures: dict[str, Any] = {"learning_settings": labels.replace(" ", ","),
                               "learning_json": str(out / "learning.json")}
    rng = np.random.default_rng(12345)
    for mode in modes:
        srcc = [per_seed[str(s)][str(mid)][mode]["srcc"] or 0.0 for s in seeds]
        summary[f"srcc_{mode}_n{mid}"] = {"per_seed": srcc, "mean": float(np.mean(srcc))}
        figures[f"learning_srcc_{mode}_n{mid}_mean"] = round(float(np.mean(srcc)), 3)
    for a, b in PAIRS:
        if a not in modes or b not in modes:
            continue
        diffs = [(per_seed[str(s)][str(mid)][a]["srcc"] or 0) - (per_seed[str(s)][str(mid)][b]["srcc"] or 0)
                 for s in seeds]
        mean = float(np.mean(diffs))
        boot = np.empty(replicates)
        for r in range(replicates):
            total = 0.0
            for s in seeds:
                ra, rb = rows[s][str(mid)][a], rows[s][str(mid)][b]
                photos = sorted(set(ra) & set(rb))
                pick = [photos[i] for i in rng.integers(0, len(photos), len(photos))]
                total += ((spearman_mean([ra[k][0] for k in pick], [ra[k][1] for k in pick]) or 0.0)
                          - (spearman_mean([rb[k][0] for k in pick], [rb[k][1] for k in pick]) or 0.0))
            boot[r] = total / len(seeds)
        lo, hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
        half = (float(stats.t.ppf(0.975, len(seeds) - 1) * np.std(diffs, ddof=1) / np.sqrt(len(seeds)))
                if len(seeds) > 1 else float("nan"))
        key = f"learning_{a}_minus_{b}_srcc_n{mid}"
        summary[key] = {"per_seed": diffs, "mean": mean, "bootstrap_photos_95": [lo, hi],
                        "t_seeds_95": [mean - half, mean + half], "seeds_above_0.1": sum(d >= 0.1 for d in diffs)}
        for s, d in zip(seeds, diffs):
            emit(f"{key}_seed{s}", round(d, 3))
        figures[key] = round(mean, 3)
        figures[f"{key}_lo"], figures[f"{key}_hi"] = round(lo, 3), round(hi, 3)
        figures[f"{key}_seed_lo"], figures[f"{key}_seed_hi"] = round(mean - half, 3), round(mean + half, 3)
    json.dump({"summary": summary, "per_seed": per_seed}, open(out / "learning.json", "w"), indent=2, default=str)
    return figures
