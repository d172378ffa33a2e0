"""``conformance``: the contract cases (kcr_trio.bench.conformance) as one pass per target.

Runs once per target whatever ``--runs`` says (pass/fail does not need medians)."""

from __future__ import annotations

from kcr_trio.bench.conformance import run_checks
from kcr_trio.bench.model import Context, Options, StepResult
from kcr_trio.bench.targets import Target


class ConformanceScenario:
    name = "conformance"
    title = "Contract cases (api-contract §9): pass/fail per target"
    once = True

    def steps(self, opts: Options) -> list[str]:
        return ["§9 cases"]

    async def run(self, ctx: Context, target: Target, step: str, rep: int) -> StepResult:
        rows = await run_checks(target, ctx.opts)
        res = StepResult(info={"cases": rows})
        for status in ("pass", "fail", "skip"):
            res.figures[{"pass": "passed", "fail": "failed", "skip": "skipped"}[status]] = sum(
                r["status"] == status for r in rows)
        for r in rows:
            if r["status"] == "fail":
                res.error(f"case {r['case']}: {r['detail']}")
        return res
