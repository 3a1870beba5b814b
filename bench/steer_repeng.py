"""repeng's methods in behaviorc: the same directions as repeng's, on the same pairs.

On smollm2-135m (the built-in), for ten cheerful/gloomy pairs at layers 5-8, reading
the last token (repeng's reading), this computes each direction twice:

  baseline  repeng's own `read_representations` (pca_diff, pca_center), an oracle run
            only here: repeng is not a behaviorc dependency (it pins numpy < 2). Install
            it beside, e.g. `pip install --target /tmp/repeng_oracle --no-deps repeng
            scikit-learn joblib threadpoolctl narwhals` and run with PYTHONPATH=/tmp/repeng_oracle.
  ours      `behaviorc.steer.extract.extract` with `method pca_diff` / `pca_center`
            through the embedded engine.

Both read the text the engine reads (the prompt through the chat template, then the
completion). Reported: the cosine of each pair of directions per layer (signed: ours
point from negative to positive, repeng's by a vote of the pairs), and how each relates
to the mean difference. The headline is the smallest cosine against the 0.99 target.

  PYTHONPATH=/tmp/repeng_oracle python bench/steer_repeng.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from behaviorc.engine.embedded import EmbeddedEngine
from behaviorc.lang.data import read_pair
from behaviorc.model.builtin import ensure_builtin
from behaviorc.model.chat import model_prompt
from behaviorc.steer.extract import extract

LAYERS = [5, 6, 7, 8]
TARGET = 0.99
# ten cheerful/gloomy replies to everyday questions, also the steering tests' pairs
PAIRS_FILE = Path(__file__).resolve().parent.parent / "specs" / "data" / "mood_pairs.jsonl"


def main() -> int:
    torch.set_num_threads(1)
    import numpy

    # repeng 0.4's annotations name np.float_, which numpy 2 removed; nothing calls it.
    numpy.float_ = getattr(numpy, "float_", numpy.float64)
    try:
        from repeng.extract import DatasetEntry, read_representations
    except ImportError:
        print("repeng is not importable: see this file's notes for installing it beside", file=sys.stderr)
        return 2
    engine = EmbeddedEngine.load(ensure_builtin("smollm2-135m"), name="smollm2-135m")
    tokenizer, model = engine.tokenizer, engine.model
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pairs = [read_pair(json.loads(line)) for line in PAIRS_FILE.read_text().splitlines()]
    entries = [DatasetEntry(positive=model_prompt(tokenizer, p.prompt) + p.positive,
                            negative=model_prompt(tokenizer, p.prompt) + p.negative) for p in pairs]
    mean = extract(engine, pairs, LAYERS, method="mean_diff", read="last").vectors.directions
    figures: dict[str, dict[str, float]] = {}
    for method in ("pca_diff", "pca_center"):
        theirs = read_representations(model, tokenizer, entries, LAYERS, batch_size=32, method=method)
        ours = extract(engine, pairs, LAYERS, method=method, read="last").vectors.directions
        for layer in LAYERS:
            reference = torch.from_numpy(theirs[layer]).double()
            cos = lambda a, b: float(torch.cosine_similarity(a.double(), b.double(), dim=0))  # noqa: E731
            figures[f"{method}@{layer}"] = {
                "cos_repeng": cos(ours[layer], reference),
                "ours_cos_mean_diff": cos(ours[layer], mean[layer]),
                "repeng_cos_mean_diff": cos(reference, mean[layer]),
            }
            row = figures[f"{method}@{layer}"]
            print(f"{method:10s} layer {layer}: cos(ours, repeng) {row['cos_repeng']:+.5f}   "
                  f"cos with mean_diff: ours {row['ours_cos_mean_diff']:+.4f}, "
                  f"repeng {row['repeng_cos_mean_diff']:+.4f}")
    worst = min(abs(row["cos_repeng"]) for row in figures.values())
    print(json.dumps({"bench": "steer_repeng", "figures": figures,
                      "headline": {"what": "smallest |cosine| of behaviorc's pca_diff/pca_center "
                                           "with repeng's (layers 5-8, last token)",
                                   "ratio": worst / TARGET, "target": TARGET}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
