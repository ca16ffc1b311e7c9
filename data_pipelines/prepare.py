"""`python -m data_pipelines.prepare --config run.yaml [--set k=v ...]`: materialise the token shards.

The same entrypoint runs locally and as a Ray job on a cluster; `raylm data prepare` is the friendlier
front end with a progress display.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from data_pipelines.pipeline import prepare
from data_pipelines.stats import CorpusStats


def main(argv: list[str] | None = None) -> int:
    from cluster.config import ConfigError, load_config
    from cluster.local_ray import ensure_ray

    parser = argparse.ArgumentParser(prog="python -m data_pipelines.prepare", description=__doc__)
    parser.add_argument("--config", required=True, help="run configuration YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override a.b=c")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ensure_ray(cfg.cluster)
    manifest = prepare(cfg.data, cfg.tokenizer, cfg.run_dir())
    Console().print(CorpusStats.from_dict(manifest["stats"]).table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
