"""The ``fedge`` command. Thin: parse arguments, call the library, print.

Experiment (one machine):
    fedge simulate [SCENARIO] [--set a.b=value ...]   run a federation on this machine
    fedge config   [SCENARIO] [--set ...]             validate and print the resolved config
    fedge prepare  [SCENARIO] [--set ...]             convert and hash the base model once (make install)
    fedge strategies                                  list aggregation strategies
    fedge report RUN_DIR ...                          compare runs in one offline HTML page
    fedge bench ...                                   benchmarks of whole federations (fedge bench --help)
    fedge privacy ...                                 plan ε or the noise without training (fedge privacy --help)
    fedge audit [SCENARIO]                            measure privacy with canaries (ε_lb beside ε)

Deployment (a SuperLink and real devices):
    fedge certs | keys                                TLS certificates; signing and device keys
    fedge server [SCENARIO] | client --server ...     run the SuperLink and a scenario; run a device

Artifacts (on a device):
    fedge export RUN_DIR                              build a signed artifact from a finished run
    fedge install ARTIFACT | rollback                 verify and install; back to the previous version
    fedge infer | serve --store DIR                   run the installed model once; serve it over HTTP
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
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
    # Under user-level DP the reply counts are withheld (None): say so rather than print "None/None".
    clients = ("clients withheld (DP)" if row["accepted"] is None else f"clients {row['accepted']}/{row['sampled']}"
               f"{' (' + str(row['rejected']) + ' rejected)' if row['rejected'] else ''}")
    return (f"round {row['round']:>3} | {clients} | "
            f"train loss {_fmt(row['train_loss'])} | held-out loss {_fmt(row['central_loss'])} |{acc} "
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
    from fedge.progress import LiveView

    print(f"fedge simulate: scenario '{cfg.name}', {cfg.data.num_clients} clients "
          f"({cfg.federation.clients_per_round}/round), {cfg.federation.num_rounds} rounds, "
          f"model {cfg.model.source}, strategy {cfg.strategy.name}")
    print(f"run directory: {run_dir}", flush=True)
    t0 = time.perf_counter()
    with LiveView(cfg.federation.num_rounds, format_row=_round_line, quiet=args.quiet) as view:
        summary = simulate(cfg, run_dir, on_round=view.round_done, verbose=args.verbose,
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
    for s in summary.get("samples") or []:
        print(_sample_block(s))
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; outputs in {run_dir}/ (metrics.jsonl, adapter/, "
          f"report.md, plots/)")
    return 0


def _sample_block(s: dict) -> str:
    """One demo prompt: reference, base and fine-tuned answers, with the reference's loss under each model."""
    def loss(v):
        return "" if v is None else f"  [loss of the reference {v:.2f}]"

    from fedge.reporting import one_line

    out = [f"\nprompt ({s.get('source', '')}): {one_line(s['prompt'])}"]
    if s.get("reference") is not None:
        out.append(f"  reference:  {one_line(s['reference'])}")
    out += [f"  base:       {s['base']}{loss(s.get('base_loss'))}",
            f"  fine-tuned: {s['finetuned']}{loss(s.get('finetuned_loss'))}"]
    return "\n".join(out)


def cmd_report(args) -> int:
    """Plots of several runs on the same axes + tables, as one offline HTML page."""
    from fedge.reporting import ReportError, write_html

    out = Path(args.out) if args.out else Path("runs") / f"report-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    try:
        page = write_html([Path(d) for d in args.run_dirs], out, title=args.title)
    except ReportError as err:
        print(f"fedge: {err}", file=sys.stderr)
        return 2
    print(f"report: {page} (open it in a browser; plots in {out / 'plots'}/)")
    return 0


def cmd_privacy(args) -> int:
    from fedge.privacy import accounting

    return accounting.run(args)


def cmd_bench(args) -> int:
    from simulations import bench

    return bench.run(args, args.argv[1:])


def cmd_audit(args) -> int:
    """Canary audit of a scenario's privacy: ε_lb (measured) beside ε; exit 1 when ε_lb > ε."""
    from server.app import new_run_dir
    from simulations import audit

    cfg = fcfg.load(args.scenario, args.set)
    run_dir = Path(args.run_dir) if args.run_dir else new_run_dir(cfg)
    access = args.access or ("white" if args.level == "user" else "black")
    canaries = args.canaries or (2000 if access == "white" else 256)
    if not 0.5 <= args.confidence < 1:
        raise fcfg.ConfigError(f"--confidence must be in [0.5, 1), got {args.confidence}")
    try:
        result = audit.audit_scenario(cfg, level=args.level, access=access, canaries=canaries, seed=args.seed,
                                      mechanism=args.mechanism, p=1.0 - args.confidence,
                                      client_sampling=args.client_sampling)
    except ValueError as err:
        print(f"fedge audit: {err}", file=sys.stderr)
        return 2
    audit.write(result, run_dir)
    print(audit.summary_line(result))
    print(f"outputs: {run_dir}/audit.json, report.md, {result['plot']}")
    return 1 if audit.violated(result) else 0


def cmd_keys(args) -> int:
    from fedge.export import generate_keypair

    if args.action == "node":
        from fedge.launch import make_node_keys

        k = make_node_keys(args.dir, args.name)
        print(f"device private key: {k.private_key} (copy to the device; --auth-key)")
        print(f"device public key:  {k.public_key} (register on the server: fedge server --register)")
        return 0
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
    from fedge.data import data_args, federated_split

    labels = federated_split(**data_args(cfg)).label_names
    out = build(cfg, run, privacy=privacy, metrics=metrics, labels=labels)
    print(f"signed artifact: {out}")
    return 0


def cmd_install(args) -> int:
    from fedge.families import ModelLoadError  # torch-free: a merged ONNX artifact installs without torch
    from fedge.runtime.infer import device_base_hash
    from fedge.runtime.store import ArtifactRefused, install, verify_source

    try:
        # The base is looked up only after the signature holds: an unsigned manifest names nothing we load.
        manifest, _, _ = verify_source(args.artifact, trusted_public_key=args.trusted_key)
        base_hash = device_base_hash(manifest, base_source=args.base)
        v = install(args.artifact, store_dir=args.store, trusted_public_key=args.trusted_key,
                    local_base_hash=base_hash, max_bytes=int(args.max_gib * 2**30))
    except ArtifactRefused as err:
        print(f"fedge: {err} (the installed model is unchanged)", file=sys.stderr)
        return 3
    except ModelLoadError as err:
        print(f"fedge: cannot load this device's base model to check the artifact against it: {err} "
              "(nothing installed; pass --base)", file=sys.stderr)
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
    if model.fallback_from:
        print(f"fedge: installed version {model.fallback_from['version']} was refused at load "
              f"({model.fallback_from['message']}); using version {model.version} (fedge rollback makes it "
              "permanent)", file=sys.stderr)
    if args.text is not None:
        print(json.dumps(model.classify(args.text)))
    else:
        print(model.generate(args.prompt, max_new_tokens=args.max_new_tokens))
    return 0


def cmd_serve(args) -> int:
    import os

    from fedge.runtime.serve import TOKEN_ENV, ServeError, is_loopback, serve

    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and not token:
        print(f"fedge: --host {args.host} is reachable from the network: give --token (or ${TOKEN_ENV}); "
              "without one anyone who reaches the port uses the model", file=sys.stderr)
        return 2

    def ready(server) -> None:  # printed once the port is bound and the model loaded
        m = server.slot.model
        print(f"serving {m.name} (version {m.version}, {m.backend} backend) from {args.store} on {server.url} "
              f"(/v1/chat/completions, /v1/completions, /v1/classify){'; bearer token required' if token else ''}",
              flush=True)

    try:
        serve(args.store, host=args.host, port=args.port, backend=args.backend, token=token,
              allowed_hosts=args.allow_host, workers=args.workers, queue=args.queue, request_timeout=args.timeout,
              watch_interval=args.watch_interval, ready=ready)
    except ServeError as err:
        print(f"fedge: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_certs(args) -> int:
    from fedge.launch import make_certs

    c = make_certs(args.out, hosts=tuple(args.host or ("127.0.0.1", "localhost")), days=args.days)
    print(f"CA certificate:     {c.ca_cert} (every device: --root-certificates)")
    print(f"server certificate: {c.server_cert}\nserver key:         {c.server_key} (keep on the server)")
    return 0


def cmd_server(args) -> int:
    """SuperLink on loopback + a Fleet-only proxy on --host:--port + the signed run; streams rounds until the summary.

    A non-loopback --host needs --certs and always runs with SuperNode authentication.
    """
    from fedge import launch as D
    from fedge.appsign import sign_fab, snapshot_app

    cfg = fcfg.load(args.scenario, args.set)  # validate here, before any process starts
    home = Path(args.home)
    certs = D.Certs(Path(args.certs) / "ca.crt", Path(args.certs) / "server.pem", Path(args.certs) / "server.key") \
        if args.certs else None
    if not D.is_loopback(args.host) and certs is None:
        raise D.DeployError(f"--host {args.host} is not a loopback address: --certs is required (TLS), "
                            "and devices must be registered (--register)")
    # The operator's signing key signs the app bundle (devices pinning its .pub run nothing else) and the artifacts.
    key = cfg.signing_key()
    if not key.exists():
        from fedge.export import generate_keypair

        print(f"no signing key at {key}: generating one (devices must pin {key.with_suffix('.pub')})", flush=True)
        generate_keypair(key.parent, name=key.stem)
    app_dir = Path(args.app_dir) if args.app_dir else Path(__file__).resolve().parent.parent
    # Sign and submit one frozen copy: an edit in app_dir in between would change the bundle.
    app_dir, bundle = snapshot_app(app_dir, home.resolve() / "app")
    signature = sign_fab(bundle, key)
    control = args.control_address.rpartition(":") if args.control_address else ("127.0.0.1", ":", "")
    server = D.start_server(home=home, host=args.host, port=args.port, certs=certs,
                            control_host=control[0].strip("[]") or "127.0.0.1",
                            control_port=int(control[2]) if control[2] else None,
                            supernode_auth=bool(args.register) or not D.is_loopback(args.host))
    link = server.link
    print(f"devices connect to {server.fleet_address} (Fleet API only); Control API on {server.control_address}"
          f"{' (SuperNode authentication on)' if server.supernode_auth else ''}", flush=True)
    try:
        flwr_home = home / "cli-home"
        D.write_connection(flwr_home, "fedge", server.control_address, ca_cert=certs.ca_cert if certs else None)
        for pub in args.register:
            print(f"registered device key {pub} as node {D.register_node(pub, connection='fedge', flwr_home=flwr_home)}")
        run_dir = Path(args.run_dir) if args.run_dir else home / "runs" / cfg.name
        run_id = D.submit_run(app_dir, connection="fedge", flwr_home=flwr_home, scenario=args.scenario,
                              run_dir=run_dir, overrides=args.set, app_signature=signature)
        print(f"run {run_id} submitted; waiting for {cfg.federation.clients_per_round} devices; outputs in {run_dir}",
              flush=True)
        from fedge import progress

        with progress.LiveView(cfg.federation.num_rounds, format_row=_round_line, quiet=args.quiet) as view:
            D.watch_run(run_dir, done=lambda _: (run_dir / "summary.json").exists(),
                        what=f"the run to finish (SuperLink log: {home / 'superlink.log'})", procs=[link],
                        on_row=view.round_done, on_event=view.on_event)
        print(f"done: {run_dir}/summary.json (report.md, plots/)")
    finally:
        server.stop()
    return 0


def cmd_client(args) -> int:
    """A SuperNode for this device, training on its own file; runs until stopped."""
    from fedge import launch as D

    host = args.server.rpartition(":")[0].strip("[]") or args.server
    if not D.is_loopback(host) and not args.trusted_key:
        raise D.DeployError(f"--server {args.server} is not on this machine: --trusted-key (the operator's public "
                            "key, pinned at enrolment) is required; without it any app bundle would run here")
    node = D.start_client(server=args.server, data=args.data, device_id=args.device_id, home=args.home,
                          root_certificates=args.root_certificates, auth_key=args.auth_key,
                          state_dir=args.state_dir, clientappio_port=args.clientappio_port,
                          trusted_key=args.trusted_key, local_steps=args.local_steps,
                          batch_size=args.batch_size, lora_rank=args.lora_rank, worker=not args.no_worker)
    print(f"device {args.device_id}: SuperNode pid {node.pid} connected to {args.server}; logs in {args.home}",
          flush=True)
    try:
        return node.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        D.stop(node)


def cmd_config(args) -> int:
    cfg = fcfg.load(args.scenario, args.set)
    print(fcfg.dump_yaml(cfg), end="")
    return 0


def cmd_prepare(args) -> int:
    """Convert and hash the scenario's packaged base model once, so that the first run does not pay for it."""
    from fedge import models
    from fedge.data import num_labels

    cfg = fcfg.load(args.scenario, args.set)
    t0 = time.perf_counter()
    base = models.load_base(cfg.model.source, task=cfg.model.task, num_labels=num_labels(cfg),
                            pooling=cfg.model.pooling, device="cpu", dtype="float32", seed=cfg.seed,
                            cache_dir=Path(cfg.model.cache_dir) if cfg.model.cache_dir else None)
    print(f"model {cfg.model.source} ({cfg.model.task}) ready in {time.perf_counter() - t0:.0f} s; "
          f"base hash {base.hash[:16]}")
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
    sp.add_argument("--quiet", action="store_true", help="no live view and no round lines; the summary only")
    sp.set_defaults(fn=cmd_simulate)

    sp = sub.add_parser("report", help="compare runs: plots on the same axes and tables in one offline HTML page")
    sp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    sp.add_argument("--out", help="output directory (default: runs/report-<UTC time>/)")
    sp.add_argument("--title")
    sp.set_defaults(fn=cmd_report)

    sp = sub.add_parser("prepare", help="convert and hash a scenario's base model once (make install runs it; "
                        "otherwise the first run does, ~25 s)")
    scenario_args(sp)
    sp.set_defaults(fn=cmd_prepare)

    sp = sub.add_parser("config", help="validate a scenario and print the resolved config")
    scenario_args(sp)
    sp.set_defaults(fn=cmd_config)

    from fedge.privacy import accounting
    from simulations import bench

    sp = sub.add_parser("bench", help="benchmarks that run whole federations, e.g. fedge bench strategies "
                        "--config classify --strategies fedavg,fedprox --seeds 3 (fedge bench --help)",
                        description="Benchmarks that run whole federations.")
    bench.add_commands(sp.add_subparsers(dest="bench", required=True))
    sp.set_defaults(fn=cmd_bench)
    sp = sub.add_parser("privacy", help="plan privacy without training: ε for a plan, or the noise for a target ε "
                        "(fedge privacy --help)", description="Plan a differential-privacy budget.")
    accounting.add_commands(sp.add_subparsers(dest="privacy_command", required=True))
    sp.set_defaults(fn=cmd_privacy)

    sp = sub.add_parser("keys", help="signing keys for artifacts")
    sp.add_argument("action", choices=["generate", "node"],
                    help="generate: the server's artifact signing key; node: a device's SuperNode auth key")
    sp.add_argument("--dir", default="runs/keys", help="where to write the key pair (default: %(default)s)")
    sp.add_argument("--name", default="fedge", help="file name (node keys: the device id)")
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(fn=cmd_keys)

    sp = sub.add_parser("export", help="build a signed artifact from a finished run")
    sp.add_argument("run_dir")
    sp.add_argument("--mode", choices=["adapter", "merged"])
    sp.add_argument("--formats", help="merged mode, comma-separated: F32,F16,Q8_0,Q4_1,Q4_0 (GGUF), Q4_K_M,Q5_K_M,Q6_K "
                    "(GGUF, llama.cpp quantizer: needs the llamacpp extra), int8, fp32")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.set_defaults(fn=cmd_export)

    def store_arg(sp):
        sp.add_argument("--store", required=True, help="the device's model store directory")

    sp = sub.add_parser("install", help="verify and install an artifact on this device")
    sp.add_argument("artifact")
    store_arg(sp)
    sp.add_argument("--trusted-key", required=True, help="the server's public key pinned at enrolment")
    sp.add_argument("--base", help="this device's copy of the base model (adapter artifacts; default: the "
                                   "base id the signed manifest names); its hash must equal the manifest's")
    sp.add_argument("--max-gib", type=float, default=64.0,
                    help="refuse artifacts whose payload is larger (default: %(default)s GiB)")
    sp.set_defaults(fn=cmd_install)

    sp = sub.add_parser("rollback", help="make the previously installed version current again")
    store_arg(sp)
    sp.set_defaults(fn=cmd_rollback)

    for name, fn, hlp in (("infer", cmd_infer, "run the installed model locally"),
                          ("serve", cmd_serve, "serve the installed model on a local HTTP port")):
        sp = sub.add_parser(name, help=hlp)
        store_arg(sp)
        sp.add_argument("--backend", default="auto", choices=["auto", "torch", "llama.cpp", "onnxruntime"],
                        help="onnxruntime: ONNX classifiers (onnxruntime) and causal LMs (onnxruntime-genai) without "
                             "PyTorch (auto picks it when torch is absent)")
        if name == "infer":
            g = sp.add_mutually_exclusive_group(required=True)
            g.add_argument("--prompt", help="causal LM: answer this prompt")
            g.add_argument("--text", help="classifier: classify this text")
            sp.add_argument("--max-new-tokens", type=int, default=64)
        else:
            sp.add_argument("--host", default="127.0.0.1")
            sp.add_argument("--port", type=int, default=8000)
            sp.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (default: $FEDGE_SERVE_TOKEN; "
                                            "required when --host is not loopback)")
            sp.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                            help="a DNS name clients may use in Host (IP literals and, on loopback, localhost "
                                 "always work; anything else gets 421: DNS rebinding protection)")
            sp.add_argument("--workers", type=int, default=1, help="model threads (default: %(default)s)")
            sp.add_argument("--queue", type=int, default=8, help="requests that may wait for a worker; "
                                                                 "more get 503 (default: %(default)s)")
            sp.add_argument("--timeout", type=float, default=120.0,
                            help="seconds a request may take before 504 (default: %(default)s)")
            sp.add_argument("--watch-interval", type=float, default=1.0, metavar="SECONDS",
                            help="poll the store this often and switch to a newly installed version between "
                                 "requests; 0 turns it off (default: %(default)s)")
        sp.set_defaults(fn=fn)

    sp = sub.add_parser("certs", help="a CA and a SuperLink certificate (pilot TLS)")
    sp.add_argument("--out", default="certs")
    sp.add_argument("--host", action="append", default=None, help="server IP or DNS name (repeatable)")
    sp.add_argument("--days", type=int, default=365)
    sp.set_defaults(fn=cmd_certs)

    sp = sub.add_parser("server", help="deployment: start the SuperLink and run a scenario on real devices")
    scenario_args(sp)
    sp.add_argument("--home", default="fedge-server", help="SuperLink state, logs and runs (default: %(default)s)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=9093)
    sp.add_argument("--certs", help="directory from `fedge certs` (TLS on); required unless --host is loopback")
    sp.add_argument("--register", action="append", default=[], metavar="DEVICE.pub",
                    help="device public key to register (repeatable; SuperNode authentication is on with it "
                         "and always on a non-loopback --host)")
    sp.add_argument("--control-address", metavar="HOST:PORT",
                    help="where the SuperLink's Control API listens (default: 127.0.0.1 on a free port); "
                         "never the Fleet address --host:--port")
    sp.add_argument("--run-dir")
    sp.add_argument("--app-dir", help="the fedge app directory (default: this installation)")
    sp.add_argument("--quiet", action="store_true", help="no live view and no round lines")
    sp.set_defaults(fn=cmd_server)

    sp = sub.add_parser("client", help="deployment: run this device as a SuperNode on its own data")
    sp.add_argument("--server", required=True, help="SuperLink host:port")
    sp.add_argument("--data", required=True, help="this device's JSONL/CSV/Parquet (prompt/response columns)")
    sp.add_argument("--device-id", required=True)
    sp.add_argument("--home", default="fedge-device", help="SuperNode state and logs (default: %(default)s)")
    sp.add_argument("--root-certificates", help="the CA certificate (TLS)")
    sp.add_argument("--auth-key", help="this device's private key (SuperNode authentication)")
    sp.add_argument("--state-dir", help="persistent state: model store, DP accountant history")
    sp.add_argument("--trusted-key", help="the server's signing public key (fedge keys generate), pinned at "
                                          "enrolment: app bundles and deployed models signed by anything else are "
                                          "refused (required unless --server is on this machine)")
    sp.add_argument("--clientappio-port", type=int,
                    help="local port between the SuperNode and its ClientApp processes (Flower's default: 9094); "
                         "set it when several devices share one machine")
    sp.add_argument("--local-steps", type=int, help="this device's local steps per round (default: the server's)")
    sp.add_argument("--batch-size", type=int, help="this device's batch size (default: the server's)")
    sp.add_argument("--lora-rank", type=int, help="largest LoRA rank this device trains (strategy hetlora)")
    sp.add_argument("--no-worker", action="store_true",
                    help="no warm worker: every message loads the model in a fresh process (slower)")
    sp.set_defaults(fn=cmd_client)

    sp = sub.add_parser("audit", help="measure privacy with canaries: a lower bound ε_lb beside the accountant's ε "
                        "(exit 1 when ε_lb > ε)")
    scenario_args(sp)
    sp.add_argument("--level", choices=["user", "record"], default="user",
                    help="user: canary clients through the server's DP aggregation; record: canary records in DP-SGD")
    sp.add_argument("--access", choices=["white", "black"],
                    help="auditor's view (default: white for user level, black for record level); record level, white "
                    "box: gradient canaries, the auditor sees every noisy gradient")
    sp.add_argument("--canaries", type=int, help="number of canaries m, each included with probability 1/2 "
                    "(default 2000 white box, 256 black box)")
    sp.add_argument("--confidence", type=float, default=0.95, help="confidence of ε_lb (default %(default)s)")
    sp.add_argument("--seed", type=int, default=0, help="canary and inclusion seed (default %(default)s)")
    sp.add_argument("--mechanism", help="user level: audit this UserLevelDP-compatible class ('pkg.module:Class')")
    sp.add_argument("--client-sampling", action="store_true",
                    help="user level, Poisson sampling: draw each round's cohort with the real sampler at the "
                    "scenario's q = clients_per_round / num_clients (the canaries among background clients), so the "
                    "audit charges the scenario's own ε and tests the amplification (default: every canary in every "
                    "round, q = 1)")
    sp.add_argument("--run-dir", help="write audit.json, the plot and a report.md section here "
                    "(e.g. the run being audited; default: a new runs/<run-id>/)")
    sp.set_defaults(fn=cmd_audit)

    sp = sub.add_parser("strategies", help="list the registered aggregation strategies")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_strategies)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices
    args = build_parser().parse_args(argv)
    args.argv = list(argv)  # fedge bench records the command that reproduces its results
    # SIGTERM (systemd, `kill`, a test stopping us) unwinds like Ctrl-C, so the `finally` blocks that stop
    # the SuperNode / SuperLink / proxy we started (each in its own session) run instead of orphaning them.
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return args.fn(args)
    except fcfg.ConfigError as err:
        print(f"fedge: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # known user-facing errors get one line, not a traceback
        from fedge.runtime.store import StoreError

        if isinstance(err, StoreError):  # before the imports below: a device without torch has none of them
            print(f"fedge: {err}", file=sys.stderr)
            return 2
        from fedge.data import DataError
        from fedge.launch import DeployError
        from fedge.models import ModelLoadError
        from server.checkpoint import CheckpointError
        from strategies import StrategyError

        if isinstance(err, (DataError, ModelLoadError, StrategyError, CheckpointError, DeployError)):
            print(f"fedge: {err}", file=sys.stderr)
            return 2
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
