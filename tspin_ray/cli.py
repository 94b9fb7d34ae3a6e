"""The `tspin-ray` command (also `python -m tspin_ray`).

    tspin-ray train --config jobs/demo-cpu.yaml [key.sub=value ...] [--quiet]
    tspin-ray validate-data --config jobs/demo-cpu.yaml
    tspin-ray eval --config jobs/demo-cpu.yaml --checkpoint runs/demo/checkpoints/pi_3
    tspin-ray generate --config jobs/demo-cpu.yaml --checkpoint DIR --out gen.jsonl
    tspin-ray report --run runs/demo [--run runs/other ...]
    tspin-ray study --config jobs/study-sorting.yaml [--seeds 0 1] [--iterations N] [--methods a b] [--fraction F]
    tspin-ray config  (every config key with its default and meaning)

With RAY_ADDRESS set, train/eval/generate connect to that cluster; without it they start a local Ray.
User errors print one line (`error: ...`) and exit 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import signal
import sys
import threading

from tspin_ray.errors import RunFailed, UserError
from tspin_ray.hub import resolve_hub_ids


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.lr=1e-6")


def cmd_train(args) -> int:
    from tspin_ray.config.schema import load_config
    from tspin_ray.controller.driver import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, quiet=args.quiet)
    stopped = f"; stopped early: {result['stopped']}" if result.get("stopped") else ""
    best = f", best {result['best']} (checkpoints/best)" if result.get("best") else ""
    print(f"done: {cfg.output_dir} ({result.get('iterations')} iterations, final checkpoint "
          f"{result.get('checkpoint')}{best}{stopped})")
    return 0


def cmd_validate_data(args) -> int:
    from tspin_ray.config.schema import load_config
    from tspin_ray.data.loading import format_report, load_splits
    from tspin_ray.models.checkpoints import load_format
    from tspin_ray.models.tiny import tiny_format

    cfg = resolve_hub_ids(load_config(args.config, args.overrides))
    fmt = load_format(cfg.model.path, cfg.model.trust_remote_code) if cfg.model.path else tiny_format(cfg.model.tiny)
    splits = load_splits(cfg.data, count_tokens=lambda *context: len(fmt.prompt_ids(*context)))
    print(format_report(splits))
    return 0


def cmd_export_task(args) -> int:
    """The config's held-out rows as an lm-evaluation-harness task (YAML + JSONL) for `lm_eval --include_path`."""
    from tspin_ray.config.schema import load_config
    from tspin_ray.data.loading import load_splits
    from tspin_ray.evaluation.harness import export_task

    cfg = resolve_hub_ids(load_config(args.config, args.overrides))
    rows = load_splits(cfg.data).eval
    rows = rows[: cfg.eval.size] if cfg.eval.size else rows
    path = export_task(rows, args.out, args.name, cfg.eval.max_new_tokens)
    print(f"wrote {path} ({len(rows)} rows): lm_eval --include_path {args.out} --tasks {args.name} ...")
    return 0


def _driver(args):
    """A driver for `eval` and `generate`: it reads checkpoints and never touches the config's run directory."""
    from tspin_ray.config.schema import load_config
    from tspin_ray.controller.driver import Driver
    from tspin_ray.controller.prepare import prepare

    cfg = load_config(args.config, args.overrides)
    return Driver(prepare(cfg), quiet=args.quiet, record=False)


def cmd_eval(args) -> int:
    from pathlib import Path

    from tspin_ray.models.checkpoints import check_checkpoint

    check_checkpoint(args.checkpoint)  # a missing or broken checkpoint is a one-line error
    driver = _driver(args)
    try:
        driver.start_workers()  # generators for the greedy answers, trainers for the NLL
        print(json.dumps(driver.evaluate(Path(args.checkpoint), Path(args.checkpoint).name), indent=1))
    finally:
        driver.close()
    return 0


def cmd_generate(args) -> int:
    from pathlib import Path

    from tspin_ray.models.checkpoints import check_checkpoint
    from tspin_ray.rollout.phases import prompt_rows
    from tspin_ray.rundir.store import write_atomic

    check_checkpoint(args.checkpoint)
    driver = _driver(args)
    g = driver.cfg.generation
    phase = driver.phase(Path(args.checkpoint), "generate", samples=g.samples_per_prompt,
                         temperature=g.temperature, max_new_tokens=g.max_new_tokens)
    prompts = {e.prompt_id: e.prompt for e in driver.prep.train}
    lines = []
    try:
        driver.start_workers(trainers=False)  # long-lived generators, if the config has them
        for b in driver.generate(prompt_rows(driver.prep.train, 0), phase).iter_rows():
            lines.append(json.dumps({"prompt_id": b["prompt_id"], "prompt": prompts[b["prompt_id"]],
                                     "generated": list(b["generated"])}))
    finally:
        driver.close()
    write_atomic(Path(args.out), ("\n".join(lines) + "\n").encode())
    print(f"wrote {len(lines)} rows to {args.out}")
    return 0


def cmd_report(args) -> int:
    from tspin_ray.analysis.report import write_report

    out = write_report(args.run, out_dir=args.out)
    print(f"report: {out}")
    return 0


def cmd_study(args) -> int:
    from tspin_ray.study.plan import command_line, load_study, narrow
    from tspin_ray.study.runner import run_study

    full = load_study(args.config)
    study = narrow(full, seeds=args.seeds, iterations=args.iterations, methods=args.methods,
                   output_dir=args.output_dir, fraction=args.fraction)
    path = run_study(study, quiet=args.quiet, command=command_line(study, full))
    print(f"results: {path}")
    return 0


def cmd_config(args) -> int:
    from tspin_ray.config.reference import describe, reference

    print(reference(), end="") if args.markdown else print("\n".join(describe()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tspin-ray", description="Self-play fine-tuning on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run (or resume) a training run")
    _config_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars; the iteration table only")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("validate-data", help="load and check the data of a config, print a report")
    _config_args(p)
    p.set_defaults(fn=cmd_validate_data)
    for name, fn, helptext in (("eval", cmd_eval, "exact match + NLL of a checkpoint on the eval rows"),
                               ("generate", cmd_generate, "sample responses of a checkpoint to JSONL")):
        p = sub.add_parser(name, help=helptext)
        _config_args(p)
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--quiet", action="store_true")
        if name == "generate":
            p.add_argument("--out", required=True)
        p.set_defaults(fn=fn)
    p = sub.add_parser("export-task", help="the held-out rows as an lm-evaluation-harness task (YAML + JSONL)")
    _config_args(p)
    p.add_argument("--out", required=True, help="directory for <name>.yaml and <name>.jsonl")
    p.add_argument("--name", default="tspin_heldout", help="task name (default tspin_heldout)")
    p.set_defaults(fn=cmd_export_task)
    p = sub.add_parser("report", help="plots and report.md for one or more run directories")
    p.add_argument("--run", action="append", required=True, help="run directory (repeat to compare)")
    p.add_argument("--out", default=None, help="report folder (default: RUN/report)")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("study", help="every method from one pi_0 over several seeds: tables, plots, claims")
    p.add_argument("--config", required=True, help="study config YAML (e.g. jobs/study-sorting.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="run only these seeds")
    p.add_argument("--iterations", type=int, default=None, help="self-play iterations per method")
    p.add_argument("--methods", nargs="+", default=None, help="run only these methods")
    p.add_argument("--output-dir", default=None, help="study directory (default: the config's output_dir)")
    p.add_argument("--fraction", type=float, default=None, help="annotated fraction of pi_0 and the methods "
                   "(default: the config's; pair it with its own --output-dir)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_study)
    p = sub.add_parser("config", help="list every config key")
    p.add_argument("--markdown", action="store_true", help="as docs/configuration.md: a table per section")
    p.set_defaults(fn=cmd_config)
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # `ray job stop` sends SIGTERM: leave through the same clean path as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # tspin-ray enforces and names its own length limits (data.max_prompt_tokens, training.max_length); the
    # tokenizer's "longer than the specified maximum sequence length" warning would only precede them.
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {e} (rerun the same command to resume)", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            print(f"error: {e.filename or 'writing the run directory'}: {e.strerror}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
