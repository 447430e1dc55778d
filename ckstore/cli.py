"""The ``ckstore`` command: inspect, verify, tag, compare, plot, import and clean a store.

Exit codes: 0 success; 1 verification found problems; 2 bad usage or a
ckstore error (the message says which), including a path that is not a store.
Every command takes ``--json`` for scripts; the JSON goes to stdout, messages
to stderr. Long operations draw a progress bar on stderr when it is a terminal
and ``--json`` is not given (``ckstore/_cli/progress.py``). Text read from a store (metric names, tags, paths, messages) may be
someone else's: it is printed with control characters escaped (``\x1b``), so
no escape sequence or forged line reaches the terminal.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from .errors import CkstoreError, InvalidArgumentError, StoreLockedError, UnsafeStoreError
from .storage.layout import ADVICE, require_store
from .format.manifest import MANIFEST_NAME
from .checkpoint.quarantine import QuarantineEntry
from .checkpoint.retention import RetentionPolicy
from .checkpoint.catalog import NO_METRIC_ADVICE, CheckpointInfo
from .store import Store
from .format.text import escape
from ._cli import inspect as _inspect
from ._cli.progress import bars_for


def _step_arg(text: str) -> int | str:
    # isascii: str.isdigit() is also true for "²" and other digits int() refuses.
    return int(text) if text.isascii() and text.isdigit() else text


def _git_rev(text: str) -> str:
    """``--rev``: checked here, so a value that git would take for an option is refused naming the option."""
    from .integrations.dvc.revision import check_rev

    try:
        return check_rev(text)
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("rev must", "must")) from None


def _step_number(text: str) -> int:
    """``--step``: ASCII digits only, checked here so a bad value names the option."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"must be a step number (0 or more, ASCII digits), got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    """``--wait``: checked here, so a bad value is refused in CLI terms, not as the Python ``lock_timeout=``."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # NaN and negatives; "inf" waits forever
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def _existing_store(path: str) -> str:
    """Writable commands act on an existing store only: a mistyped path must not create a new, empty one."""
    require_store(os.path.abspath(path))
    return path


def _info_json(info: CheckpointInfo) -> dict[str, Any]:
    return {
        "step": info.step,
        "metrics": dict(info.metrics),
        "tags": list(info.tags),
        "path": str(info.path),
        "created": info.created,
        "nbytes": info.nbytes,
    }


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    if args.json:
        json.dump(payload, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    elif text:
        # Fields from the store are escaped where they are formatted (so a newline in one cannot forge a
        # line); this pass catches anything else before it reaches the terminal.
        print(escape(text, keep_layout=True))


def _quarantine_json(entry: QuarantineEntry) -> dict[str, Any]:
    return {
        "step": entry.step,
        "path": str(entry.path),
        "moved": entry.moved,
        "reason": entry.reason,
        "tags": list(entry.tags),
        "problems": list(entry.problems),
    }


def _quarantine_rows(entries: Sequence[QuarantineEntry]) -> list[str]:
    return [f"quarantined: step {e.step}, {escape(e.reason)}, moved {_when(e.moved)}: {escape(str(e.path))}" for e in entries]


def cmd_ls(args: argparse.Namespace) -> int:
    with Store(args.store, readonly=True) as store:
        infos = store.checkpoints()
        latest = store.latest()
        quarantined = store.quarantine()
        best = None
        if args.metric is not None:
            from .checkpoint.retention import rank_best

            _inspect.require_metric(infos, args.metric)
            ranked = rank_best(infos, args.metric, args.mode)
            best = ranked[0].step if ranked else None
        else:
            try:
                chosen = store.best()
                best = chosen.step if chosen else None
            except CkstoreError:
                best = None
    rows = [f"{'STEP':>10}  {'CREATED':19}  {'SIZE':>10}  METRICS / TAGS"]
    for info in infos:
        metrics = " ".join(f"{escape(k)}={v:.6g}" for k, v in sorted(info.metrics.items()))
        marks = [*(f"[{escape(t)}]" for t in info.tags)]
        if info.step == best:
            marks.append("(best)")
        if latest is not None and info.step == latest.step:
            marks.append("(latest)")
        rows.append(f"{info.step:>10}  {_when(info.created)}  {_size(info.nbytes):>10}  {metrics} {' '.join(marks)}".rstrip())
    if not infos:
        rows = ["(no checkpoints)"]
    rows += _quarantine_rows(quarantined)
    payload = {"checkpoints": [_info_json(i) for i in infos], "best": best, "quarantine": [_quarantine_json(e) for e in quarantined]}
    _emit(args, payload, "\n".join(rows))
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    if args.empty:
        with Store(_existing_store(args.store), lock_timeout=args.wait, trust_foreign=args.trust_foreign) as store:
            removed = store.empty_quarantine()
        _emit(args, {"removed": [str(p) for p in removed]}, f"removed {len(removed)} quarantined checkpoint(s)")
        return 0
    with Store(args.store, readonly=True) as store:
        entries = store.quarantine()
    _emit(args, {"quarantine": [_quarantine_json(e) for e in entries]}, "\n".join(_quarantine_rows(entries)) or "(quarantine is empty)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    if args.metric is not None and args.step != "best":
        raise InvalidArgumentError(f"--metric ranks checkpoints for 'best'; it means nothing beside {args.step!r}")
    with Store(args.store, readonly=True) as store:
        if args.metric is not None:
            _inspect.require_metric(store.checkpoints(), args.metric)
            with Store(args.store, readonly=True, metric=args.metric, mode=args.mode) as ranked:
                info = ranked.resolve("best")
        else:
            info = store.resolve(_step_arg(args.step))
    payload = _info_json(info) | {"files": {name: {"size": e.size, "hash": str(e.hash)} for name, e in info.files.items()}}
    lines = [
        f"step      {info.step}",
        f"path      {escape(str(info.path))}",
        f"created   {_when(info.created)}",
        f"size      {_size(info.nbytes)} in {len(info.files)} tensor files + {MANIFEST_NAME}",
        f"metrics   {json.dumps(dict(info.metrics), sort_keys=True)}",  # ensure_ascii: escapes every control character
        f"tags      {', '.join(map(escape, info.tags)) or '-'}",
        "files:",
    ]
    lines += [f"  {escape(name):40} {_size(e.size):>10}  {escape(str(e.hash))}" for name, e in sorted(info.files.items())]
    _emit(args, payload, "\n".join(lines))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with Store(args.store, readonly=True) as store, warnings.catch_warnings(), bars_for(args) as bars:
        warnings.simplefilter("ignore")
        target = _step_arg(args.step) if args.step is not None else None
        if bars.live is None:
            total = None
        elif target is None:
            total = sum(i.nbytes for i in store.checkpoints())
        elif isinstance(target, int):  # by number: its manifest may be the corrupt part, so no resolve()
            total = sum(i.nbytes for i in store.checkpoints() if i.step == target) or None
        else:
            total = store.resolve(target).nbytes
        problems = bars.run("verify", total, store.verify, target)
        if target is None:
            checked = sorted({i.step for i in store.checkpoints()} | {p.step for p in problems if p.step is not None})
        else:  # by number without reading the manifest, which may be the corrupt part
            checked = [target if isinstance(target, int) else store.resolve(target).step]
        # Each checkpoint's manifest format (1: one hash per file; 2: chunk tables); absent where the manifest is unreadable.
        formats = {i.step: i.format_version for i in store.checkpoints() if i.step in checked}
    payload = {
        "ok": not problems,
        "checked": checked,
        "formats": {str(step): version for step, version in sorted(formats.items())},
        "problems": [{"step": p.step, "path": p.path, "message": p.message, "expected": p.expected, "actual": p.actual} for p in problems],
    }
    if problems:
        text = "\n".join(f"FAIL step {p.step}: {escape(p.message)}" for p in problems)
    else:
        text = f"OK: {len(checked)} checkpoint(s) verified"
    for version in sorted(set(formats.values())):
        steps = [str(step) for step, v in sorted(formats.items()) if v == version]
        shown = ", ".join(steps[:8]) + (f", ... ({len(steps)} in all)" if len(steps) > 8 else "")
        text += f"\nformat {version}: step {shown}" if len(steps) == 1 else f"\nformat {version}: steps {shown}"
    _emit(args, payload, text)
    return 1 if problems else 0


def cmd_tag(args: argparse.Namespace) -> int:
    if args.delete is not None:  # "" too: it is an invalid tag (exit 2), not a request to list tags
        with Store(_existing_store(args.store), lock_timeout=args.wait, trust_foreign=args.trust_foreign) as store:
            store.untag(args.delete)
        _emit(args, {"untagged": args.delete}, f"removed tag {escape(args.delete)}")
        return 0
    if args.name is None:
        with Store(args.store, readonly=True) as store:
            tags = {t: i.step for i in store.checkpoints() for t in i.tags}
        _emit(args, {"tags": tags}, "\n".join(f"{escape(t)}\t{s}" for t, s in sorted(tags.items())) or "(no tags)")
        return 0
    with Store(_existing_store(args.store), lock_timeout=args.wait, trust_foreign=args.trust_foreign) as store:
        target = store.resolve(_step_arg(args.step)).step
        info = store.tag(target, args.name)
    _emit(args, _info_json(info), f"tagged step {info.step} as {escape(args.name)}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    # Checked here, so a bad value names the option, not the RetentionPolicy field (keep_last=).
    for option, value in (("--keep-last", args.keep_last), ("--keep-best", args.keep_best), ("--keep-every", args.keep_every)):
        if value is not None and value < 1:
            raise InvalidArgumentError(f"{option} must be a positive integer, got {value}")
    if args.metric is not None and not args.metric:
        raise InvalidArgumentError("--metric must name a metric, got an empty string")
    if args.keep_best is not None and args.metric is None:
        raise InvalidArgumentError("--keep-best needs --metric (the metric that ranks checkpoints)")
    policy = RetentionPolicy(
        keep_last=args.keep_last, keep_best=args.keep_best, metric=args.metric, mode=args.mode, keep_every=args.keep_every
    )
    if not policy.prunes:
        policy = None  # only recover leftovers
    with Store(_existing_store(args.store), lock_timeout=args.wait, trust_foreign=args.trust_foreign) as store:
        if args.metric is not None:  # a typo would leave --keep-best nothing to rank, and prune the best
            _inspect.require_metric(store.checkpoints(), args.metric)
        deleted = store.gc(policy=policy, dry_run=args.dry_run)
        remaining = [i.step for i in store.checkpoints()]
    if args.dvc:  # also the DVC cache (and remote with --cloud), keeping what any branch or tag names
        from .integrations.dvc import publish as _dvc

        _dvc.collect_garbage(_dvc.resolve_repo(args.repo, args.store, "."), cloud=args.cloud, remote=args.remote, dry=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    _emit(
        args,
        {"dry_run": args.dry_run, "deleted": deleted, "remaining": remaining},
        f"{verb} {len(deleted)} checkpoint(s){': ' + ', '.join(map(str, deleted)) if deleted else ''}; {len(remaining)} remain",
    )
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from .integrations.dvc import publish as _dvc

    if args.recover:
        root = _dvc.resolve_repo(args.repo, args.store, ".")
        results = _dvc.recover(root)
        payload = {"recovered": [{"name": r.name, "step": r.step, "dvc_file": str(r.dvc_file), "tag": r.tag} for r in results]}
        _emit(args, payload, f"recovered {len(results)} interrupted publish(es) in {root}")
        return 0
    if args.name is None:
        if isinstance(_step_arg(args.step), int):  # ASCII digits only: "١".isdigit() is true too
            raise InvalidArgumentError("publish needs --name NAME for a step number (or --recover)")
        args.name = args.step  # `ckstore publish STORE best` publishes the best checkpoint as "best"
    with Store(args.store, lock_timeout=args.wait, trust_foreign=args.trust_foreign) as store:
        publication = store.publish(
            _step_arg(args.step), name=args.name, repo=args.repo, dest=args.dest, remote=args.remote, weights_only=args.weights_only
        )
        with bars_for(args) as bars:  # DVC hashes and pushes in its own processes: a bar of activity and time
            result = bars.run(f"publish {args.name}", None, publication.result)
    payload = {
        "name": result.name,
        "step": result.step,
        "dvc_file": str(result.dvc_file),
        "md5": result.md5,
        "commit": result.commit,
        "tag": result.tag,
        "remote": result.remote,
        "artifact": result.artifact,
    }
    rel = os.path.relpath(result.dvc_file)
    _emit(args, payload, f"published step {result.step} as {result.name} ({result.tag}); fetch it with: dvc pull {rel}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .integrations.dvc import publish as _dvc

    with bars_for(args) as bars:
        path = bars.run("pull", None, _dvc.pull, args.store, repo=args.repo, remote=args.remote, force=args.force, rev=args.rev)
    with Store(path, readonly=True) as store, warnings.catch_warnings(), bars_for(args) as bars:
        warnings.simplefilter("ignore")
        problems = bars.run("verify", sum(i.nbytes for i in store.checkpoints()), store.verify)
        checked = [i.step for i in store.checkpoints()]
    payload = {"ok": not problems, "path": str(path), "checked": checked, "problems": [p.message for p in problems]}
    _emit(args, payload, f"pulled {path}: step {', '.join(map(str, checked))}, every file verified" if not problems else "\n".join(payload["problems"]))
    return 1 if problems else 0


def cmd_delete(args: argparse.Namespace) -> int:
    with Store(_existing_store(args.store), lock_timeout=args.wait, trust_foreign=args.trust_foreign) as store:
        info = store.resolve(_step_arg(args.step))
        store.delete(info.step, force=args.force)
    untagged = sorted(info.tags) if args.force else []
    note = f" and its tags {', '.join(map(escape, untagged))}" if untagged else ""
    _emit(args, {"deleted": info.step, "untagged": untagged}, f"deleted step {info.step}{note}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    with Store(args.store, readonly=True) as store, bars_for(args) as bars:
        payload = _inspect.diff(store, _step_arg(args.a), _step_arg(args.b), bars)
    _emit(args, payload, _inspect.diff_text(payload, _size, escape))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    with Store(args.store, readonly=True) as store:
        payload = _inspect.plot(store, args.metric, args.mode, args.output, title=args.title)
    _emit(args, payload, f"wrote {escape(payload['path'])}: {payload['points']} checkpoint(s), best step {payload['best']}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from ._cli.transfer import run_import

    with bars_for(args) as bars:
        payload = run_import(args, bars)
    skipped = f"; not imported: {', '.join(map(escape, payload['skipped']))}" if payload["skipped"] else ""
    tags = f", tagged {', '.join(map(escape, payload['tags']))}" if payload["tags"] else ""
    _emit(args, payload, f"imported {escape(payload['source'])} ({payload['format']}) as step {payload['step']}{tags}, verified{skipped}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ._cli.transfer import run_export

    args.step = _step_arg(args.step)
    with bars_for(args) as bars:
        payload = run_export(args, bars)
    if payload["format"] == "hf":
        files = ", ".join(map(escape, payload["files"]))
        text = f"exported step {payload['step']} as a from_pretrained directory: {escape(payload['path'])} ({files})"
    else:
        text = f"exported step {payload['step']} as one safetensors file: {escape(payload['path'])}"
    _emit(args, payload, text)
    return 0


# Python arguments named in library messages, and the options that say the same on the command line.
_OPTION_ADVICE = (
    ("; untag it or pass force=True", "; untag it or pass --force"),
    ("; pass step=N", "; pass --step N"),
    ("; pass format= one of", "; pass --format, one of"),
    ("; pass overwrite=True (--force) to", "; pass --force to"),
    ("max_shard_size must", "--max-shard-size must"),
)


def _cli_message(exc: CkstoreError) -> str:
    """The error's message, with the way out said in CLI options rather than Python arguments."""
    if isinstance(exc, StoreLockedError) and "lock_timeout=" in str(exc):  # the writer lock's Python advice
        who = f"pid {exc.pid} on {exc.host}" if exc.pid is not None else "another process"
        return (
            f"{exc.path}: the store is being written by {who}; one writer per store. "
            "Pass --wait SECONDS to wait for it; ls, show, verify, tag and publish work while it runs"
        )
    if isinstance(exc, InvalidArgumentError) and str(exc).endswith(NO_METRIC_ADVICE):  # "best" with no metric known
        return str(exc).replace(
            NO_METRIC_ADVICE,
            "the writer recorded none; pass --metric NAME (and --mode max if higher is better), or name a step or a tag instead of 'best'",
        )
    if isinstance(exc, (InvalidArgumentError, FileExistsError)):  # FileExistsError: the export's ExportExistsError
        for python, cli in _OPTION_ADVICE:
            if python in str(exc):
                return str(exc).replace(python, cli)
    if isinstance(exc, InvalidArgumentError) and str(exc).endswith("; pass repo=... (or --repo)"):  # no DVC repository found
        return str(exc).replace("pass repo=... (or --repo)", "pass --repo")
    if isinstance(exc, UnsafeStoreError):
        return str(exc).replace(ADVICE, "ls, show and verify read it as it is; pass --trust-foreign to write it if you trust its owner")
    return str(exc)


def _trust_foreign_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-foreign", action="store_true", help="write the store even if another user owns it or can modify it (see docs/security.md)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckstore", description="Inspect, verify, tag, compare, plot, import, export and clean a ckstore checkpoint store."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, fn) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("store", help="path of the store directory")
        p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
        p.set_defaults(fn=fn)
        return p

    p = command("ls", "list committed checkpoints, ascending by step", cmd_ls)
    p.add_argument("--metric", help="rank by this metric to mark the best (default: the metric the writer used)")
    p.add_argument("--mode", choices=("min", "max"), default="min", help="whether lower or higher --metric is better")

    p = command(
        "quarantine", "list checkpoints a save moved aside (failed verification, left ahead by a rollback); --empty deletes them", cmd_quarantine
    )
    p.add_argument("--empty", action="store_true", help="delete every quarantined checkpoint (needs the writer lock)")
    p.add_argument("--wait", type=_seconds, default=0, help="with --empty: seconds to wait for the writer lock (default: fail at once)")
    _trust_foreign_option(p)

    p = command("show", "show one checkpoint: metrics, tags, files with sizes and hashes", cmd_show)
    p.add_argument("step", help="step number, 'latest', 'best' or a tag")
    p.add_argument("--metric", help="with 'best': rank by this metric (default: the metric the writer used)")
    p.add_argument("--mode", choices=("min", "max"), default="min", help="whether lower or higher --metric is better")

    p = command("verify", "check every file against its manifest (all checkpoints, or one); exit 1 on any problem", cmd_verify)
    p.add_argument("step", nargs="?", help="step number, 'latest', 'best' or a tag (default: all)")

    p = command("tag", "tag a checkpoint (pins it against retention), list tags, or remove one", cmd_tag)
    p.add_argument("name", nargs="?", help="tag to set (omit to list tags)")
    p.add_argument("step", nargs="?", default="latest", help="step number, 'latest', 'best' or a tag (default: latest)")
    p.add_argument("-d", "--delete", metavar="NAME", help="remove tag NAME instead")
    p.add_argument("--wait", type=_seconds, default=0, help="seconds to wait for the writer lock (default: fail at once)")
    _trust_foreign_option(p)

    p = command("gc", "remove leftovers of interrupted saves and deletes; apply a retention policy if given", cmd_gc)
    p.add_argument("--keep-last", type=int, help="keep the N newest")
    p.add_argument("--keep-best", type=int, help="keep the N best by --metric")
    p.add_argument("--metric", help="metric that ranks checkpoints for --keep-best")
    p.add_argument("--mode", choices=("min", "max"), default="min", help="whether lower or higher --metric is better")
    p.add_argument("--keep-every", type=int, help="keep steps that are multiples of N")
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    p.add_argument("--wait", type=_seconds, default=0, help="seconds to wait for the writer lock (default: fail at once)")
    _trust_foreign_option(p)
    p.add_argument("--dvc", action="store_true", help="also dvc gc the repository's cache, keeping what the workspace, any branch or tag names")
    p.add_argument("--cloud", action="store_true", help="with --dvc: collect the DVC remote too (same protection)")
    p.add_argument("--repo", help="with --dvc: the git + DVC repository (default: the one holding the store, else the current directory)")
    p.add_argument("--remote", help="with --dvc --cloud: the DVC remote (default: the repository's default remote)")

    p = command("publish", "publish a checkpoint to DVC as <repo>/<dest>/NAME.dvc: verify, dvc add, dvc push, git commit + tag", cmd_publish)
    p.add_argument("step", nargs="?", default="best", help="step number, 'latest', 'best' or a tag (default: best)")
    p.add_argument("--name", help="the published name: dvc pull <dest>/NAME.dvc fetches it (default: STEP when it is a word)")
    p.add_argument("--repo", help="the git + DVC repository (default: the one holding the store, else the current directory)")
    p.add_argument("--dest", default="models", help="directory inside the repository for NAME.dvc (default: models)")
    p.add_argument("--remote", help="DVC remote to push to (default: the repository's default remote)")
    p.add_argument(
        "--weights-only", action="store_true",
        help="publish only the model's weights (the state's 'model' entry, at <dest>/NAME/model.safetensors), no optimizer state",
    )
    p.add_argument("--recover", action="store_true", help="only finish or roll back interrupted publishes into the repository")
    p.add_argument("--wait", type=_seconds, default=0, help="seconds to wait for the writer lock (default: fail at once)")
    _trust_foreign_option(p)

    p = command("delete", "delete one checkpoint crash-safely; a tagged or published one needs --force", cmd_delete)
    p.add_argument("step", help="step number, 'latest', 'best' or a tag")
    p.add_argument("--force", action="store_true", help="delete it even if it is tagged or published (its tags go with it)")
    p.add_argument("--wait", type=_seconds, default=0, help="seconds to wait for the writer lock (default: fail at once)")
    _trust_foreign_option(p)

    p = command("diff", "compare two checkpoints tensor by tensor: changed (by content hash), added, removed, with sizes", cmd_diff)
    p.add_argument("a", help="step number, 'latest', 'best' or a tag")
    p.add_argument("b", help="step number, 'latest', 'best' or a tag")

    p = command("plot", "draw a metric over steps as a PNG, marking best, tagged and published checkpoints (needs ckstore[plot])", cmd_plot)
    p.add_argument("--metric", required=True, help="the metric to draw")
    p.add_argument("--mode", choices=("min", "max"), default="min", help="whether lower or higher --metric is better (marks the best)")
    p.add_argument("-o", "--output", required=True, help="the PNG file to write")
    p.add_argument("--title", help="the plot's title (default: the metric and the store's name)")

    p = sub.add_parser(
        "import", help="import a torch.save file, Lightning .ckpt, HF checkpoint-N or DCP directory as one verified checkpoint",
        description="Import a checkpoint another tool wrote (never unpickling anything that needs code to run); the source is only read.",
    )
    p.add_argument("src", help="the torch.save / .ckpt file, or the checkpoint-N / DCP directory")
    p.add_argument("store", help="path of the store directory (created if new)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.add_argument("--step", type=_step_number, help="the step number (default: the one the source records; required if it has none)")
    p.add_argument("--name", help="tag the imported checkpoint NAME")
    p.add_argument(
        "--format", choices=("auto", "torch", "lightning", "hf", "dcp"), default="auto", help="the source's format (default: detect)"
    )
    p.add_argument("--wait", type=_seconds, default=0, help="seconds to wait for the writer lock (default: fail at once)")
    _trust_foreign_option(p)
    p.set_defaults(fn=cmd_import)

    p = command("export", "write a checkpoint's weights as a from_pretrained directory (--hf) or one safetensors file", cmd_export)
    p.add_argument("step", help="step number, 'latest', 'best' or a tag")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--hf", metavar="DIR", help="write a Hugging Face directory: config, HF key names, tied weights as HF expects, shards"
    )
    where.add_argument("--safetensors", metavar="FILE", help="write the weights as one flat safetensors file")
    p.add_argument("--key", default="model", help="the state key holding the module (default: model)")
    p.add_argument("--max-shard-size", default="5GB", help="with --hf: split weights into shards of at most this size (default: 5GB)")
    p.add_argument("--force", action="store_true", help="replace an existing export")

    p = command("pull", "fetch a published checkpoint (STORE is <dest>/NAME or its .dvc file) and install it verified", cmd_pull)
    p.add_argument("--repo", help="the git + DVC repository (default: the one holding STORE)")
    p.add_argument("--remote", help="DVC remote to fetch from (default: the repository's default remote)")
    p.add_argument(
        "--rev", type=_git_rev,
        help="the version at this git revision (a tag such as best@v1.0.0, a branch or a commit); also sets NAME.dvc to it",
    )
    p.add_argument(
        "--force", action="store_true",
        help="replace the target even if it holds checkpoints no published version has, or its writer lock is held",
    )
    return parser


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None
) -> None:
    # A warning names a skipped checkpoint and quotes what was wrong with it: text from the store, escaped.
    print(f"ckstore: warning: {escape(str(message))}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # restores showwarning afterwards (main is also called in-process)
        warnings.showwarning = _show_warning
        try:
            return int(args.fn(args))
        except CkstoreError as exc:
            message = _cli_message(exc)
            if getattr(args, "json", False):
                json.dump({"error": type(exc).__name__, "message": message}, sys.stdout)  # ensure_ascii escapes
                sys.stdout.write("\n")
            print(f"ckstore: error: {escape(message)}", file=sys.stderr)
            return 2
        except BrokenPipeError:
            # `ckstore ls STORE | head`: the reader left. Exit as a shell reports a process killed by SIGPIPE,
            # and point stdout at /dev/null so the interpreter's final flush does not print a second traceback.
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            except (OSError, ValueError):  # stdout without a file descriptor (main() called in-process)
                pass
            return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
