"""`activator inject FILE|-`: manifests in, the same manifests injected out.

For people who keep their manifests in git: the transformation the webhook
does at admission (inject.py), applied offline to multi-document YAML
(Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs,
and `kind: List` of them); every other document passes through as it was.
The result goes to stdout, one line per workload to stderr saying what was
done and why not, as `linkerd inject` does. YAML is read as kubectl reads
it (YAML 1.1); comments are not kept.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from activator.inject import DEFAULT_IMAGE, METRICS_PORT, Injection, Options, Status, inject

if TYPE_CHECKING:
    import yaml

# PyYAML is imported when a command reads or writes YAML, not when the CLI
# defines its parser: every `activator` process (the sidecar too) builds it.


class ManifestError(Exception):
    """Input that is not YAML manifests; the message names the file and where."""


@functools.cache
def _yaml() -> tuple[type[yaml.SafeLoader], type[yaml.SafeDumper]]:
    import yaml

    class Dumper(yaml.SafeDumper):
        """Block style throughout; scripts (multi-line strings) as literal blocks."""

    def represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, represent_str)
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader), Dumper


def load(text: str, source: str) -> list[Any]:
    """The documents of a multi-document YAML text; empty ones dropped."""
    import yaml

    loader, _ = _yaml()
    try:
        docs = list(yaml.load_all(text, Loader=loader))
    except yaml.YAMLError as exc:
        where = ""
        if (mark := getattr(exc, "problem_mark", None)) is not None:
            where = f" line {mark.line + 1} column {mark.column + 1}"
        raise ManifestError(f"{source}:{where} is not YAML: {exc}") from None
    return [doc for doc in docs if doc is not None]


def dump(docs: Sequence[Any]) -> str:
    import yaml

    _, dumper = _yaml()
    return "---\n".join(
        yaml.dump(doc, Dumper=dumper, sort_keys=False, default_flow_style=False, width=1000)
        for doc in docs
    )


def inject_all(docs: Sequence[Any], options: Options) -> tuple[list[Any], list[Injection]]:
    """Each document injected; the items of a `kind: List` too."""
    out: list[Any] = []
    done: list[Injection] = []
    for doc in docs:
        if not isinstance(doc, dict):
            out.append(doc)
        elif doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            items, injections = inject_all(doc["items"], options)
            out.append({**doc, "items": items})
            done.extend(injections)
        else:
            injection = inject(doc, options)
            out.append(injection.manifest)
            done.append(injection)
    return out, done


def add_parser(sub: Any) -> None:
    """`activator inject`, on the CLI's subparsers."""
    cmd = sub.add_parser(
        "inject",
        help="add the pod-activator sidecar to annotated workloads: inject FILE|- ...",
        description="Read Kubernetes manifests (multi-document YAML), write them to stdout "
        "with the pod-activator sidecar added to every pod template annotated with "
        "zeropod's or pod-activator's annotations.",
    )
    cmd.add_argument("files", nargs="+", metavar="FILE", help="a YAML file, or - for stdin")
    cmd.add_argument("--image", default=DEFAULT_IMAGE, help=f"sidecar image ({DEFAULT_IMAGE})")
    cmd.add_argument(
        "--image-pull-policy",
        choices=["Always", "IfNotPresent", "Never"],
        help="the sidecar's imagePullPolicy (default: Kubernetes' for the tag)",
    )
    cmd.add_argument(
        "--metrics-port",
        type=int,
        default=METRICS_PORT,
        help=f"the sidecar's metrics port ({METRICS_PORT})",
    )
    cmd.set_defaults(run=run)


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    options = Options(
        image=args.image, image_pull_policy=args.image_pull_policy, metrics_port=args.metrics_port
    )
    docs: list[Any] = []
    try:
        for name in args.files:
            if name == "-":
                docs.extend(load(stdin.read(), "stdin"))
                continue
            try:
                text = Path(name).read_text()
            except OSError as exc:
                raise ManifestError(f"cannot read {name}: {exc.strerror}") from None
            docs.extend(load(text, name))
    except ManifestError as exc:
        print(f"activator: error: {exc}", file=sys.stderr)
        return 1
    out, injections = inject_all(docs, options)
    stdout.write(dump(out))
    for injection in injections:
        if injection.status is Status.INJECTED:
            print(f"{injection.name}: injected ({', '.join(injection.managed)})", file=sys.stderr)
        elif injection.status is Status.ALREADY:
            print(f"{injection.name}: already injected", file=sys.stderr)
        for warning in injection.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return 0
