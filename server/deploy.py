"""After the last round: build the signed artifact and redeploy it through Flower.

    adapter/ (PEFT)  --build_artifact-->  artifacts/v<N>/ (manifest.json, manifest.sig, payload)
                     --deploy message-->  every connected node verifies, installs atomically, replies
                                          with its installed version or the refusal reason

The artifact travels as a Flower ``ArrayRecord`` of uint8 file contents (message
type ``query.deploy``), never through a side channel. ``deployment.json`` in the
run directory records which device runs which version.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedge import config as fcfg
from fedge import protocol as P
from fedge.messaging import send_and_receive

log = logging.getLogger("fedge.deploy")


def privacy_spent(report: dict):
    """The guarantee the artifact carries: user-level if released, else the worst client's record-level ε."""
    from fedge.export import PrivacySpent

    if "user_level" in report:
        u = report["user_level"]
        return PrivacySpent(epsilon=u["epsilon"], delta=u["delta"], accountant="rdp", unit="user")
    if "record_level" in report and report["record_level"]["epsilon"]:
        r = report["record_level"]
        return PrivacySpent(epsilon=max(r["epsilon"].values()), delta=r["delta"], accountant=r["accountant"],
                            unit="record")
    return None


def build(cfg: fcfg.RunConfig, run_dir: Path, *, privacy: dict, metrics: dict, labels=None) -> Path:
    """Sign and write ``artifacts/v<N>``; the version counter lives next to the signing key."""
    from fedge.export import build_artifact, generate_keypair
    from fedge.export.artifact import next_version

    key = cfg.signing_key()
    if not key.exists():
        log.warning("no signing key at %s: generating one (pilot use; devices must pin %s)", key,
                    key.with_suffix(".pub"))
        generate_keypair(key.parent, name=key.stem)
    version = next_version(key.parent / "artifact-version")
    return build_artifact(run_dir / "adapter", run_dir / "artifacts" / f"v{version}", base_source=cfg.model.source,
                          private_key=key, mode=cfg.export.mode, task=cfg.model.task,
                          labels=list(labels) if labels else None, pooling=cfg.model.pooling,
                          formats=cfg.export.formats, version=version,
                          privacy=privacy_spent(privacy), metrics=metrics, cache_dir=cfg.model.cache_dir)


def deploy(grid: Grid, artifact_dir: Path, *, client_name, timeout: float, nodes: list[int] | None = None) -> dict:
    """Send the artifact to ``nodes`` (default: every connected node); return {client: {version | refused, message}}."""
    from fedge.export import artifact_to_arrays

    files = ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in artifact_to_arrays(artifact_dir).items()})
    nodes = sorted(grid.get_node_ids()) if nodes is None else sorted(nodes)
    msgs = [Message(RecordDict({P.ARTIFACT: files}), message_type=P.DEPLOY_TYPE, dst_node_id=n) for n in nodes]
    devices: dict[str, dict] = {}
    for reply in send_and_receive(grid, msgs, timeout=timeout):
        name = client_name(int(reply.metadata.src_node_id))
        if reply.has_error():
            devices[name] = {"refused": "error", "message": reply.error.reason}
        else:
            devices[name] = dict(reply.content[P.DEPLOY_RESULT])
    for n in nodes:  # no reply within the timeout
        devices.setdefault(client_name(n), {"refused": "no-reply", "message": f"no reply within {timeout:.0f} s"})
    return dict(sorted(devices.items()))


def _pointer(cfg: fcfg.RunConfig) -> Path:
    """Where the latest published artifact is recorded: next to the signing key and its version counter."""
    return cfg.signing_key().parent / "published.json"


def publish(cfg: fcfg.RunConfig, artifact: Path) -> None:
    """Record ``artifact`` as the one devices should run (atomic; never moves backwards)."""
    version = int(artifact.name[1:])
    old = published(cfg)
    if old is not None and old[0] >= version:
        return
    p = _pointer(cfg)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": version, "path": str(artifact.resolve())}))
    tmp.replace(p)


def published(cfg: fcfg.RunConfig) -> tuple[int, Path] | None:
    """(version, directory) of the latest published artifact, if it is still on disk."""
    try:
        rec = json.loads(_pointer(cfg).read_text())
        path = Path(rec["path"])
        return (int(rec["version"]), path) if (path / "manifest.json").exists() else None
    except (OSError, ValueError, KeyError):
        return None


def catch_up(grid: Grid, strategy, cfg: fcfg.RunConfig, *, attempted: set[int], timeout: float) -> dict:
    """Deploy the published artifact to connected nodes that report an older one.

    Nodes are asked for their installed version once (the identity query, ``strategy.discover``);
    each node gets at most one attempt per run (``attempted``), so a device that refuses the
    artifact (another base model, say) is not sent it every round.
    """
    pub = published(cfg)
    if pub is None:
        return {}
    version, path = pub
    nodes = sorted(grid.get_node_ids())
    strategy.discover(grid, nodes)
    behind = [n for n in nodes if n not in attempted and strategy.nodes.installed.get(n, 0) < version]
    if not behind:
        return {}
    attempted.update(behind)
    devices = deploy(grid, path, client_name=strategy.client_name, timeout=timeout, nodes=behind)
    by_name = {strategy.client_name(n): n for n in behind}
    for name, result in devices.items():
        if "refused" not in result and name in by_name:
            strategy.nodes.installed[by_name[name]] = int(result.get(P.DEPLOY_VERSION, 0))
    log.info("caught up %d of %d devices that ran an older artifact than v%d",
             sum("refused" not in d for d in devices.values()), len(behind), version)
    return devices


def linger(grid: Grid, strategy, cfg: fcfg.RunConfig, *, seconds: float, timeout: float, poll_s: float = 2.0) -> dict:
    """After the final deployment: for ``seconds``, deploy the new artifact to devices that join late.

    Devices connected now were sent it already (their reported version is from before it).
    """
    attempted = set(grid.get_node_ids())
    late: dict = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        late.update(catch_up(grid, strategy, cfg, attempted=attempted, timeout=timeout))
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    return late


def export_and_deploy(grid: Grid, cfg: fcfg.RunConfig, run_dir: Path, *, privacy: dict, metrics: dict,
                      client_name, labels=None) -> dict:
    artifact = build(cfg, run_dir, privacy=privacy, metrics=metrics, labels=labels)
    publish(cfg, artifact)
    out = {"artifact": str(artifact), "version": int(artifact.name[1:]), "mode": cfg.export.mode}
    if cfg.export.deploy:
        out["devices"] = deploy(grid, artifact, client_name=client_name, timeout=cfg.federation.round_timeout_s)
        ok = [d for d in out["devices"].values() if d.get(P.DEPLOY_VERSION) == out["version"] and "refused" not in d]
        out["installed"] = len(ok)
        log.info("deployed v%d to %d of %d devices", out["version"], len(ok), len(out["devices"]))
    (run_dir / "deployment.json").write_text(json.dumps(out, indent=2))
    return out
