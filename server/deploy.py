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
from pathlib import Path

from flwr.app import ArrayRecord, Array, Message, RecordDict
from flwr.serverapp import Grid

from fedge import config as fcfg
from fedge import protocol as P

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
                          labels=list(labels) if labels else None, formats=cfg.export.formats, version=version,
                          privacy=privacy_spent(privacy), metrics=metrics, cache_dir=cfg.model.cache_dir)


def deploy(grid: Grid, artifact_dir: Path, *, client_name, timeout: float) -> dict:
    """Send the artifact to every connected node; return {client: {version | refused, message}}."""
    from fedge.export import artifact_to_arrays

    files = ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in artifact_to_arrays(artifact_dir).items()})
    nodes = sorted(grid.get_node_ids())
    msgs = [Message(RecordDict({P.ARTIFACT: files}), message_type=P.DEPLOY_TYPE, dst_node_id=n) for n in nodes]
    devices: dict[str, dict] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        name = client_name(int(reply.metadata.src_node_id))
        if reply.has_error():
            devices[name] = {"refused": "error", "message": reply.error.reason}
        else:
            devices[name] = dict(reply.content[P.DEPLOY_RESULT])
    for n in nodes:  # no reply within the timeout
        devices.setdefault(client_name(n), {"refused": "no-reply", "message": f"no reply within {timeout:.0f} s"})
    return dict(sorted(devices.items()))


def export_and_deploy(grid: Grid, cfg: fcfg.RunConfig, run_dir: Path, *, privacy: dict, metrics: dict,
                      client_name, labels=None) -> dict:
    artifact = build(cfg, run_dir, privacy=privacy, metrics=metrics, labels=labels)
    out = {"artifact": str(artifact), "version": int(artifact.name[1:]), "mode": cfg.export.mode}
    if cfg.export.deploy:
        out["devices"] = deploy(grid, artifact, client_name=client_name, timeout=cfg.federation.round_timeout_s)
        ok = [d for d in out["devices"].values() if d.get(P.DEPLOY_VERSION) == out["version"] and "refused" not in d]
        out["installed"] = len(ok)
        log.info("deployed v%d to %d of %d devices", out["version"], len(ok), len(out["devices"]))
    (run_dir / "deployment.json").write_text(json.dumps(out, indent=2))
    return out
