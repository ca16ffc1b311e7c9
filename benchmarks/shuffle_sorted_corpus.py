"""Why training data is shuffled: configs/tiny-cpu.yaml on tinyshakespeare sorted by speaker, with and
without `data.shuffle`.

The corpus is the vendored tinyshakespeare with its speeches (blank-line-separated paragraphs) sorted by
speaker name, the way real corpora arrive sorted by source, date or topic. Validation is the same
hash-selected 5% of speeches in both runs, so it samples every speaker. Without the shuffle the model
walks through the speakers alphabetically and its loss tracks whichever it is reading; with it every
batch mixes speakers. Prints the training loss at every logged step, the validation losses and the
final validation loss of each run.

    python benchmarks/shuffle_sorted_corpus.py [--max-steps 200] [--json out.json]

Joins RAY_ADDRESS when set, else starts an embedded Ray. Figures depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from cluster.config import load_config
from cluster.local_ray import ensure_ray
from jobs.pretrain import run

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "third_party" / "tinyshakespeare" / "tinyshakespeare.txt"


def sorted_corpus(out: Path) -> Path:
    """tinyshakespeare with its speeches stably sorted by speaker ("NAME:" on each speech's first line)."""
    speeches = [p for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    speeches.sort(key=lambda p: p.split(":", 1)[0].strip())
    path = out / "shakespeare-by-speaker.txt"
    path.write_text("\n\n".join(speeches) + "\n", encoding="utf-8")
    return path


def one_run(corpus: Path, root: Path, shuffle: bool, max_steps: int) -> dict:
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", [
        f"data.paths=[{corpus}]", f"data.shuffle={str(shuffle).lower()}", f"cluster.storage_path={root}",
        f"cluster.run_name=shuffle-{'on' if shuffle else 'off'}", f"train.max_steps={max_steps}",
        f"train.eval_every={max(1, max_steps // 4)}", "train.log_every=10",
    ])
    ensure_ray(cfg.cluster)
    records = run(cfg).metrics
    return {
        "train": {r["step"]: r["loss"] for r in records if r["event"] == "train"},
        "val": {r["step"]: r["val_loss"] for r in records if r["event"] == "val"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--json", type=Path, help="write both curves here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="raylm-shuffle-") as tmp:
        corpus = sorted_corpus(Path(tmp))
        runs = {name: one_run(corpus, Path(tmp) / "runs", name == "on", args.max_steps)
                for name in ("off", "on")}
    for kind in ("train", "val"):
        off, on = runs["off"][kind], runs["on"][kind]
        print(f"\n{'step':>6} {kind + ' loss, no shuffle':>22} {kind + ' loss, shuffle':>19}")
        for step in sorted(on):
            print(f"{step:>6} {off.get(step, float('nan')):>22.4f} {on[step]:>19.4f}")
    final = {name: r["val"][max(r["val"])] for name, r in runs.items()}
    print(f"\nfinal validation loss: no shuffle {final['off']:.4f}, shuffle {final['on']:.4f} "
          f"(difference {final['off'] - final['on']:+.4f})")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "final_val_loss": final}, indent=1))


if __name__ == "__main__":
    main()
