"""Linter-style lines for a run's results: ``path: location: CODE message``, one per finding,
near miss or failed model, a footer with the counts and the command that applies the fixes, and
GitHub workflow annotations (``--format github``) carrying the same findings.

A finding is what ``--check`` fails on (a group to fuse, a conv to expand, late binding); a near
miss is a pattern left alone, with its reason. Codes are stable strings: a skip's own ``code``
where the pass gave one, else ``near-miss`` (or the finding's name, e.g. ``late-binding``).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from gconv_rewrite import formats
from gconv_rewrite.report import rewrite_kind

NEAR_MISS = "near-miss"  # the code of a skip record that carries none of its own


@dataclass(frozen=True)
class Finding:
    path: str
    location: str
    code: str
    message: str
    # "error": --check fails on it (or the model failed); "warning": a near miss left alone;
    # "notice": a rewrite a real run made.
    severity: str


def rewrite_code(kind: str) -> str:
    """The code --check reports a rewrite it would make under."""
    return {"fusion": "fusable-group", "expansion": "expandable-conv"}.get(rewrite_kind(kind), kind)


def _where(record: dict) -> str:
    return f"{record['graph']}/{record['location']}" if record.get("graph") else record["location"]


def _rewrite_message(record: dict) -> str:
    groups, channels, nodes = record["groups"], record["channels"], len(record["nodes"])
    if rewrite_kind(record["kind"]) == "expansion":
        shape = f"Conv(group={groups}) -> {nodes} nodes"
    elif rewrite_kind(record["kind"]) == "batchnorm fold":
        shape = "folded into the fused conv's weights"
    else:
        shape = f"{nodes} nodes -> Conv(group={groups})"
    return f"{record['kind']}: {shape}, channels {channels['in']}->{channels['out']}"


def model_findings(result, *, check: bool) -> list[Finding]:
    """One model's lines: its error, or each rewrite (a finding under --check, a notice after a
    real run) and each skip (a near miss, or a finding such as late binding)."""
    path = result.input
    if result.error is not None:
        return [Finding(path, "-", result.error_kind or result.status, result.error, "error")]
    report = result.report or {}
    found = [Finding(path, _where(r), rewrite_code(r["kind"]) if check else r["kind"], _rewrite_message(r),
                     "error" if check else "notice")
             for r in report.get("rewrites", [])]
    for skip in report.get("skipped", []):
        code = skip.get("code") or skip.get("finding") or NEAR_MISS
        found.append(Finding(path, _where(skip), code, skip["reason"], "error" if skip.get("finding") else "warning"))
    return found


def text_line(finding: Finding) -> str:
    """``path: location: CODE message``, escaped so that a name cannot forge a second line."""
    return formats.shown(f"{finding.path}: {finding.location}: {finding.code} {finding.message}")


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def github_line(finding: Finding) -> str:
    """A GitHub workflow command: ``::error file=PATH,title=CODE::location: message``."""
    return (f"::{finding.severity} file={_escape_property(finding.path)},title={_escape_property(finding.code)}"
            f"::{_escape_data(f'{finding.location}: {finding.message}')}")


def footer(results, *, mode: str, check: bool, fix: str) -> str | None:
    """The counts and the command that applies the fixes, for --check and --dry-run:
    ``2 models would be rewritten (5 groups); run: gconv-rewrite models/ --fuse``; ``fix``: that command."""
    changing = [r for r in results if (r.report or {}).get("rewrites")]
    if not check and not changing:
        return None
    groups = sum(1 for r in changing for w in r.report["rewrites"] if rewrite_kind(w["kind"]) != "batchnorm fold")
    failed = sum(1 for r in results if r.error is not None)
    late = sum(1 for r in results for s in (r.report or {}).get("skipped", []) if s.get("finding"))
    noun = "convolution" if mode == "expand" else "group"
    parts = [f"{len(changing)} model{'s' if len(changing) != 1 else ''} would be rewritten "
             f"({groups} {noun}{'s' if groups != 1 else ''})"]
    if late:
        parts.append(f"{late} other finding{'s' if late != 1 else ''}")
    if failed:
        parts.append(f"{failed} model{'s' if failed != 1 else ''} failed")
    line = "; ".join(parts)
    if changing:
        line += f"; run: {fix}"
    return line


def fix_command(models, flags: list[str]) -> str:
    """The command line that applies what --check / --dry-run found, quoted for a shell."""
    return " ".join(["gconv-rewrite", *(shlex.quote(formats.shown(str(m))) for m in models), *flags])
