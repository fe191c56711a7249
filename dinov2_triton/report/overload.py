"""The report's "Overload" section: the bench stage's overload check
(results.json ``overload``, dinov2_triton.bench.overload_records) as a table of
the burst's numbers and PASS/FAIL per claim, each with the numbers it was
decided on."""
from __future__ import annotations

from typing import Any

from dinov2_triton.bench.results import PerfResults

VERDICT = {True: "PASS", False: "FAIL", None: "n/a"}


def _n(x: Any, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def overload_blocks(results: PerfResults) -> list[tuple]:
    """Blocks for dinov2_triton.report.report (``[]`` when no overload check ran)."""
    check = results.overload
    if check is None:
        return []
    st = check.settings
    b: list[tuple] = [("h2", "Overload")]
    b.append(("p", f"A bounded open-loop burst at {st.factor:g}x the measured capacity for up to {st.seconds:g} s "
                   f"(at most {st.max_requests} requests of one image, {st.protocol}, loopback {check.url}) against "
                   f"the ensemble (encoded images) and the classifier it calls; the queue timeout is the one the "
                   f"server reports for its served config. Host load average at the start: {check.load_average}."))
    b.append(("p", f"**{check.summary}**"))
    head = ["model", "offered (req/s asked / reached)", "accepted", "shed (UNAVAILABLE/503)", "failed", "p50 ms",
            "p99 ms", "timeout + batch ms", "sheds", "p99 <= timeout + batch", "same logits"]
    body, items = [], []
    for t in check.targets:
        if t.skipped:
            body.append([f"`{t.model}`", "-", "-", "-", "-", "-", "-", "-", "n/a", "n/a", "n/a"])
            items.append(f"`{t.model}` not measured: {t.skipped}")
            continue
        bound = (f"{_n(t.queue_timeout_ms, 'g')} + {_n(t.one_batch_ms()[0], '.1f')}" if t.queue_timeout_ms is not None
                 else "no timeout")
        offered = f"{t.offered} ({_n(t.rate_rps, '.1f')} / {_n(t.achieved_rps, '.1f')})"
        body.append([f"`{t.model}`", offered, t.accepted, t.shed, t.failed,
                     _n(t.p50_ms), _n(t.p99_ms), bound, VERDICT[t.sheds.passed], VERDICT[t.p99_bounded.passed],
                     VERDICT[t.same_logits.passed]])
        items += [f"`{t.model}` sheds: **{VERDICT[t.sheds.passed]}**: {t.sheds.detail}",
                  f"`{t.model}` p99 <= timeout + one batch: **{VERDICT[t.p99_bounded.passed]}**: "
                  f"{t.p99_bounded.detail}",
                  f"`{t.model}` same logits after the burst: **{VERDICT[t.same_logits.passed]}**: "
                  f"{t.same_logits.detail}",
                  f"`{t.model}` capacity {_n(t.capacity_rps, '.1f')} req/s ({t.capacity_source}); one batch "
                  f"{_n(t.batch_ms, '.1f')} ms ({t.batch_source or 'not measured'}); during the burst "
                  f"{_n(t.burst_batch_ms, '.1f')} ms ({t.burst_batch_source or 'not measured'})"]
    b.append(("table", head, body))
    b.append(("ul", items))
    b.append(("p", "Latencies are the client's, of the accepted requests. A config without a queue policy sheds "
                   "nothing (n/a): its queue grows instead" + (", which fails this run (strict)." if st.strict
                                                               else "; the run does not fail for it.")))
    return b
