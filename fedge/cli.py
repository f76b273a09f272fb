"""The ``fedge`` command. Thin: parse arguments, call the library, print.

    fedge simulate [SCENARIO] [--set a.b=value ...]   run a federation on this machine
    fedge config   [SCENARIO] [--set ...]             validate and print the resolved config
    fedge strategies                                  list aggregation strategies
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedge import config as fcfg


def _fmt(v, spec=".4f") -> str:
    return "—" if v is None else format(v, spec)


def _mib(b) -> str:
    return "—" if b is None else f"{b / 2**20:.2f}"


def _round_line(row: dict) -> str:
    if row["round"] == 0:
        acc = f"  acc {row['central_accuracy']:.3f}" if row.get("central_accuracy") is not None else ""
        return f"round   0 | held-out loss {row['central_loss']:.4f}{acc}  (base model + empty adapter)"
    acc = f" acc {row['central_accuracy']:.3f} |" if row.get("central_accuracy") is not None else ""
    return (f"round {row['round']:>3} | clients {row['accepted']}/{row['sampled']}"
            f"{' (' + str(row['rejected']) + ' rejected)' if row['rejected'] else ''} | "
            f"train loss {_fmt(row['train_loss'])} | held-out loss {row['central_loss']:.4f} |{acc} "
            f"local {_fmt(row['local_eval_loss'])} | up {_mib(row['bytes_up_per_client'])} MiB/client "
            f"down {_mib(row['bytes_down_per_client'])} MiB/client |{_eps(row)} {row['seconds']:.1f} s")


def _eps(row: dict) -> str:
    parts = []
    if row.get("epsilon_user") is not None:
        parts.append(f"ε user {row['epsilon_user']:.2f}")
    if row.get("epsilon_record_max") is not None:
        parts.append(f"ε record ≤ {row['epsilon_record_max']:.2f}")
    return (" " + ", ".join(parts) + " |") if parts else ""


def cmd_simulate(args) -> int:
    from server.app import new_run_dir
    from simulations.runner import simulate

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise fcfg.ConfigError(f"--resume: {run_dir} is not a run directory (no config.yaml)")
        cfg = fcfg.load(run_dir / "config.yaml", args.set)
    else:
        cfg = fcfg.load(args.scenario, args.set)
        run_dir = Path(args.run_dir) if args.run_dir else new_run_dir(cfg)
    print(f"fedge simulate: scenario '{cfg.name}', {cfg.data.num_clients} clients "
          f"({cfg.federation.clients_per_round}/round), {cfg.federation.num_rounds} rounds, "
          f"model {cfg.model.source}, strategy {cfg.strategy.name}")
    print(f"run directory: {run_dir}", flush=True)
    t0 = time.perf_counter()
    summary = simulate(cfg, run_dir, on_round=lambda row: print(_round_line(row), flush=True), verbose=args.verbose,
                       resume=bool(args.resume), force=args.force)
    print(f"\nheld-out loss {summary['initial_central_loss']:.4f} -> {summary['final_central_loss']:.4f}"
          f"  ({summary['adapter_parameters']:,} adapter parameters exchanged; base {summary['base_parameters']:,})")
    priv = summary.get("privacy", {})
    if "differential_privacy" in priv:
        print(f"privacy: {priv['differential_privacy']}")
    else:
        if "user_level" in priv:
            print(f"privacy: user-level (ε = {priv['user_level']['epsilon']:.3f}, δ = {priv['user_level']['delta']:g})")
        if "record_level" in priv:
            eps = priv["record_level"]["epsilon"]
            print(f"privacy: record-level DP-SGD, ε per client ≤ {max(eps.values()):.3f} "
                  f"(δ = {priv['record_level']['delta']:g}, {len(eps)} clients)")
    dep = summary.get("deployment")
    if dep:
        line = f"artifact v{dep['version']} ({dep['mode']}) signed: {dep['artifact']}"
        if "devices" in dep:
            line += f"; installed on {dep['installed']} of {len(dep['devices'])} devices"
            refused = {k: v for k, v in dep["devices"].items() if "refused" in v}
            line += "".join(f"\n  {k}: refused ({v['refused']}): {v.get('message', '')}" for k, v in refused.items())
        print(line)
    if "sample_prompt" in summary:
        print(f"\nprompt:     {summary['sample_prompt']}")
        print(f"base:       {summary['base_answer']}")
        print(f"fine-tuned: {summary['finetuned_answer']}")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; outputs in {run_dir}/ (metrics.jsonl, adapter/, report.md)")
    return 0


def cmd_privacy(argv: list[str]) -> int:
    from fedge.privacy.accounting import main as privacy_main

    return privacy_main(argv)


def cmd_keys(args) -> int:
    from fedge.export import generate_keypair

    paths = generate_keypair(args.dir, name=args.name, overwrite=args.overwrite)
    print(f"private key: {paths.private} (keep it on the server, mode 0600)")
    print(f"public key:  {paths.public_pem} (pin it on every device)")
    print(f"fingerprint: {paths.fingerprint}")
    return 0


def cmd_export(args) -> int:
    from server.deploy import build

    run = Path(args.run_dir)
    overrides = list(args.set) + ([f"export.mode={args.mode}"] if args.mode else [])
    if args.formats:
        overrides.append(f"export.formats=[{args.formats}]")
    cfg = fcfg.load(run / "config.yaml", overrides)
    privacy = json.loads((run / "privacy.json").read_text()) if (run / "privacy.json").exists() else {}
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    metrics = {k: summary.get(k) for k in ("final_central_loss", "final_central_accuracy") if k in summary}
    from clients.runtime import data_args
    from fedge.data import federated_split

    labels = federated_split(**data_args(cfg)).label_names
    out = build(cfg, run, privacy=privacy, metrics=metrics, labels=labels)
    print(f"signed artifact: {out}")
    return 0


def cmd_install(args) -> int:
    from fedge.runtime.store import ArtifactRefused, install

    try:
        v = install(args.artifact, store_dir=args.store, trusted_public_key=args.trusted_key)
    except ArtifactRefused as err:
        print(f"fedge: {err} (the installed model is unchanged)", file=sys.stderr)
        return 3
    print(f"installed version {v} in {args.store}")
    return 0


def cmd_rollback(args) -> int:
    from fedge.runtime.store import rollback

    print(f"version {rollback(args.store)} is current again")
    return 0


def cmd_infer(args) -> int:
    from fedge.runtime.infer import load_installed

    model = load_installed(args.store, backend=args.backend)
    if args.text is not None:
        print(json.dumps(model.classify(args.text)))
    else:
        print(model.generate(args.prompt, max_new_tokens=args.max_new_tokens))
    return 0


def cmd_serve(args) -> int:
    from fedge.runtime.serve import serve

    print(f"serving {args.store} on http://{args.host}:{args.port} (/v1/chat/completions, /v1/classify)", flush=True)
    serve(args.store, host=args.host, port=args.port, backend=args.backend)
    return 0


def cmd_config(args) -> int:
    cfg = fcfg.load(args.scenario, args.set)
    print(fcfg.dump_yaml(cfg), end="")
    return 0


def cmd_strategies(args) -> int:
    from strategies import describe

    rows = describe()
    if args.json:
        print(json.dumps([{"name": n, "summary": s, "paper": p} for n, s, p in rows], indent=2))
        return 0
    width = max(len(n) for n, _, _ in rows)
    for name, summary, paper in rows:
        print(f"{name:<{width}}  {summary}" + (f"  [{paper}]" if paper else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedge", description="Federated LoRA fine-tuning on edge devices.")
    sub = p.add_subparsers(dest="command", required=True)

    def scenario_args(sp):
        sp.add_argument("scenario", nargs="?", default=fcfg.DEFAULT_SCENARIO,
                        help="packaged scenario name or path to a YAML file (default: %(default)s)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")

    sp = sub.add_parser("simulate", help="run a federation on this machine (Flower simulation engine)")
    scenario_args(sp)
    sp.add_argument("--run-dir", help="write outputs here instead of runs/<run-id>/")
    sp.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last complete round")
    sp.add_argument("--force", action="store_true", help="with --resume: accept a changed config")
    sp.add_argument("--verbose", action="store_true", help="show Flower and Ray logs")
    sp.set_defaults(fn=cmd_simulate)

    sp = sub.add_parser("config", help="validate a scenario and print the resolved config")
    scenario_args(sp)
    sp.set_defaults(fn=cmd_config)

    sub.add_parser("privacy", help="plan privacy without training: ε for a plan, or the noise for a target ε "
                   "(fedge privacy --help)")

    sp = sub.add_parser("keys", help="signing keys for artifacts")
    sp.add_argument("action", choices=["generate"])
    sp.add_argument("--dir", default="runs/keys", help="where to write the key pair (default: %(default)s)")
    sp.add_argument("--name", default="fedge")
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(fn=cmd_keys)

    sp = sub.add_parser("export", help="build a signed artifact from a finished run")
    sp.add_argument("run_dir")
    sp.add_argument("--mode", choices=["adapter", "merged"])
    sp.add_argument("--formats", help="merged mode, comma-separated: Q8_0,Q4_0,F16,int8,fp32")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.set_defaults(fn=cmd_export)

    def store_arg(sp):
        sp.add_argument("--store", required=True, help="the device's model store directory")

    sp = sub.add_parser("install", help="verify and install an artifact on this device")
    sp.add_argument("artifact")
    store_arg(sp)
    sp.add_argument("--trusted-key", required=True, help="the server's public key pinned at enrolment")
    sp.set_defaults(fn=cmd_install)

    sp = sub.add_parser("rollback", help="make the previously installed version current again")
    store_arg(sp)
    sp.set_defaults(fn=cmd_rollback)

    for name, fn, hlp in (("infer", cmd_infer, "run the installed model locally"),
                          ("serve", cmd_serve, "serve the installed model on a local HTTP port")):
        sp = sub.add_parser(name, help=hlp)
        store_arg(sp)
        sp.add_argument("--backend", default="auto", choices=["auto", "torch", "llama.cpp"])
        if name == "infer":
            g = sp.add_mutually_exclusive_group(required=True)
            g.add_argument("--prompt", help="causal LM: answer this prompt")
            g.add_argument("--text", help="classifier: classify this text")
            sp.add_argument("--max-new-tokens", type=int, default=64)
        else:
            sp.add_argument("--host", default="127.0.0.1")
            sp.add_argument("--port", type=int, default=8000)
        sp.set_defaults(fn=fn)

    sp = sub.add_parser("strategies", help="list the registered aggregation strategies")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_strategies)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices
    if argv and argv[0] == "privacy":  # its own parser (fedge/privacy/accounting.py)
        return cmd_privacy(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except fcfg.ConfigError as err:
        print(f"fedge: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # known user-facing errors get one line, not a traceback
        from fedge.data import DataError
        from fedge.models import ModelLoadError
        from strategies import StrategyError

        from fedge.runtime.store import StoreError
        from server.checkpoint import CheckpointError

        if isinstance(err, (DataError, ModelLoadError, StrategyError, CheckpointError, StoreError)):
            print(f"fedge: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
