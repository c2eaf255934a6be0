"""One command for everything: `higgs-min SUBCOMMAND ...` (pyproject [project.scripts]).

    higgs-min train --help                          = python -m higgs_min.train --help
    torchrun --nproc-per-node 2 --no-python higgs-min train --device cpu
    higgs-min prepare | export | eval | checkpoint | plot | bench | generate | pack ...

Each subcommand is the same parser as its `python -m higgs_min.<module>` form: the words after the
subcommand go to that module's main(argv). A new command is one line in COMMANDS
("module:function", help); the module is imported only when its command runs.
"""

from __future__ import annotations

import difflib
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("higgs_min.train.run:main", "LoRA fine-tuning (one process, or many under torchrun)"),
    "prepare": ("higgs_min.prepare.encode:main", "wav -> codes, codes -> wav, and the data subcommands"),
    "export": ("higgs_min.export.merge:main", "merge an adapter into base weights: a complete base folder"),
    "checkpoint": ("higgs_min.checkpoint:main", "verify or list checkpoints"),
    "eval": ("higgs_min.train.eval_cli:main", "score a checkpoint on held-out data (the in-training eval's figures)"),
    "plot": ("higgs_min.train.plot:main", "metrics.jsonl -> loss.png"),
    "bench": ("higgs_min.bench.rows:main", "the benchmark rows (make bench)"),
    "generate": ("higgs_min.generate.cli:main", "speech from a trained adapter: text -> codes -> wav"),
    "pack": ("higgs_min.prepare.pack:pack_main", "JSONL with codes -> a packed corpus folder (= prepare pack)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return ("usage: higgs-min COMMAND [options]   (higgs-min COMMAND --help for its options)\n\ncommands:\n"
            + "".join(f"  {name:<{width}}  {help_}\n" for name, (_, help_) in COMMANDS.items()))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        print(f"higgs-min: unknown command {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
              + f" (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module, _, func = COMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), func)(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
