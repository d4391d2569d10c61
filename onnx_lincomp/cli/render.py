"""Human-readable rendering of the library's reports (the library itself never prints)."""
from __future__ import annotations

import click


def fmt_int(n) -> str:
    return "?" if n is None else f"{n:,}"


def print_analysis(model: str, a) -> None:
    src = (f"{a.calibration} ({a.samples} samples"
           f"{', RANDOM data: rates say little about real inputs' if a.random else ''})")
    click.echo(f"{model}\ncalibration: {src}")
    if not a.layers:
        click.echo("no top-level Relu: nothing to analyse" + (" (Relus inside subgraphs are listed below)"
                                                             if a.not_analysed else ""))
    click.echo(f"{'relu':<34} {'width':>6} {'dead':>6} {'always':>6} {'med.rate':>8} {'dead params':>11}  note")
    for layer in a.layers:
        note = "" if layer.rewritable else "not rewritable: " + layer.reason
        click.echo(f"{layer.relu[:34]:<34} {layer.width:>6} {layer.dead:>6} {layer.always_active:>6} "
                   f"{layer.median_position_rate:>8.3f} {layer.dead_params:>11,}  {note}")
    for name, why in a.not_analysed:
        click.echo(f"{name[:34]:<34} not analysed: {why}")
    click.echo(f"plans at exact rates: remove-dead saves {a.dead_params_total:,} parameters, fold-linear "
               f"{a.fold_params_total:,} (first round, before cascading folds and merges)")


def print_plans(plans) -> None:
    """What each pass would do (``--explain``): matches and skip reasons with examples."""
    for plan in plans:
        click.echo(f"{plan.pass_name}: {len(plan.matches)} sites, ~{plan.params_saved:,} parameters saved"
                   + (" (approximate)" if plan.approximate else ""))
        for m in plan.matches:
            click.echo(f"  {m.action:<13} {m.site[:40]:<40} {m.units:>6} units  ~{m.params_saved:>10,} params  "
                       f"{m.detail}")
        for why, n in plan.skipped.items():
            shown = plan.examples.get(why, ())
            names = ", ".join(shown[:3]) + (f", … ({len(shown)} in all)" if len(shown) > 3 else "")
            click.echo(f"  skipped {n}x: {why}" + (f" (e.g. {names})" if names else ""))


def print_certificate(cert) -> None:
    click.echo(f"domain: {cert.domain.description}")
    click.echo(f"{'relu':<20} {'units':>6} {'sampled':>8} {'search':>7} {'interval a/i':>13} {'relax a/i':>10} "
               f"{'milp a/i':>9} {'milp unst':>9} {'open':>5} {'stable a/i ch':>14}")
    for lc in cert.layers:
        click.echo(f"{lc.relu[:20]:<20} {lc.units:>6} {lc.sampled_unstable:>8} {lc.search_unstable:>7} "
                   f"{lc.interval_active:>6}/{lc.interval_inactive:<6} {lc.relaxed_active:>4}/{lc.relaxed_inactive:<5} "
                   f"{lc.milp_active:>4}/{lc.milp_inactive:<4} {lc.milp_unstable:>9} {lc.unproven:>5} "
                   f"{int(lc.stably_active.sum()):>6}/{int(lc.stably_inactive.sum()):<7}")
    for r in cert.not_certified:
        click.echo(f"{r[:20]:<20} not certified: {cert.stop_reason}")
    t = cert.seconds
    click.echo(f"verdict: {'COMPLETE (every unit decided)' if cert.complete else 'INCOMPLETE (open units are kept)'}; "
               f"{cert.milp_solves} MILP solves; seconds: bounds {t['bounds']:.2f}, search {t['search']:.2f}, "
               f"milp {t['milp']:.2f}, total {t['total']:.2f}")


def _lat(lat) -> str:
    return "-" if lat is None else f"{lat.median_ms:.3f} ms"


def _print_passes(r) -> None:
    click.echo(f"{'pass':<14} {'removed':>8} {'folded':>7} {'params before':>14} {'after':>12} {'MACs after':>12} "
               f"{'time':>8}")
    for p in r.passes:
        res = p.result
        macs = fmt_int(p.after.macs) + ("+" if p.after.nodes_without_shapes else "")
        click.echo(f"{res.name:<14} {res.neurons_removed:>8} {res.neurons_folded:>7} {p.params_before:>14,} "
                   f"{p.params_after:>12,} {macs:>12} {p.seconds * 1000:>6.1f}ms")
        for why, n in res.skipped.items():
            click.echo(f"{'':<14} skipped {n}x: {why}")
        for note in res.notes + tuple(x for x in (p.shapes, p.check) if x):
            click.echo(f"{'':<14} {note}")
    if any(p.after.nodes_without_shapes for p in r.passes):
        click.echo(f"{'':<14} MACs after ending in +: nodes without static shapes in the rewritten graph are not "
                   "counted there (the totals below may count them by a run of the model)")


def _print_sizes(r) -> None:
    b, a = r.before, r.after
    click.echo(f"{'':<14} {'before':>14} {'after':>14} {'ratio':>7}")
    for label, x, y in (("parameters", b.params, a.params), ("MACs/sample", b.macs, a.macs),
                        ("file bytes", b.size_bytes, a.size_bytes)):
        click.echo(f"{label:<14} {x:>14,} {y:>14,} " + (f"{y / x:>7.3f}" if x else f"{'-':>7}"))
    for label, x, y, ch in (("latency b=1", b.latency_b1, a.latency_b1, a.change_b1),
                            ("latency batch", b.latency_batch, a.latency_batch, a.change_batch)):
        if x and y and ch:
            click.echo(f"{label:<14} {_lat(x):>14} {_lat(y):>14} {ch.ratio:>7.3f}  {ch.verdict} "
                       f"(ratio interval {ch.low:.3f}-{ch.high:.3f}, interleaved rounds)")


def _print_storage(s: dict) -> None:
    loads = {True: "onnxruntime loads it", False: "onnxruntime does not load it", None: "load not tried"}
    click.echo(f"storage: dense {s['dense_bytes']:,} bytes, zipped {s['zipped_bytes']:,}, sparse_initializer "
               f"{s['sparse_bytes']:,} ({s['sparse_tensors']} sparse tensor(s), {loads[s['sparse_loads']]})")
    click.echo("unstructured sparsity does not make onnxruntime faster")


def _print_verification(r) -> None:
    splits = (("calibration" if r.certificate is None else "box check", r.on_calibration), ("held-out", r.on_heldout),
              ("all samples (gate)", r.on_all))
    for label, v in splits:
        if v is None:
            continue
        acc = ""
        if v.paired is not None:
            p = v.paired
            acc = (f", accuracy {p.accuracy_before.describe(unit='%')} -> {p.accuracy_after.describe(unit='%')}, "
                   f"drop {p.describe()}")
        agree = [o.top1_agreement for o in v.outputs if o.top1_agreement is not None]
        click.echo(f"{label}: max abs error {v.max_abs:.3g} (relative {v.rel_max:.3g}), mean abs error "
                   f"{v.mean_abs:.3g} on {v.samples} samples"
                   + (f", top-1 agreement {100 * min(agree):.2f}%" if agree else "") + acc)


def print_canonical(c) -> None:
    """What canonicalisation did, skip reasons grouped with a few example names each."""
    f = c.folding
    click.echo(f"canonicalised: {c.batchnorms_folded} BatchNorm folded, {c.constants_lifted} Constant nodes lifted, "
               f"{f.nodes_folded} constant nodes folded ({f.bytes_folded:,} bytes), {c.conv_bias_adds_fused} bias Adds "
               f"fused, {c.conv_pads_made_explicit} auto_pad made explicit"
               + (f", {c.activations_fused} hard-sigmoid/hard-swish chains fused" if c.activations_fused else ""))
    if c.initializer_inputs_dropped:
        click.echo(f"  {c.initializer_inputs_dropped} initializer(s) the input also lists as graph inputs (values a "
                   "caller may override) are constants in the output: it no longer takes them as inputs")
    for why, n in c.skipped.items():
        names = ", ".join(c.examples.get(why, ()))
        click.echo(f"  skipped {n}x: {why}" + (f" (e.g. {names})" if names else ""))


def print_optimize(r, output: str) -> None:
    click.echo(f"{r.model} -> {output}")
    held = ("" if r.certificate is not None else f"; held-out: {r.heldout_samples} samples" if r.on_heldout
            else "; held-out: not verified (no pass changed the graph)")
    click.echo(f"evidence: {r.evidence}{held}")
    c = r.canonicalize
    print_canonical(c)
    _print_passes(r)
    _print_sizes(r)
    if r.storage:
        _print_storage(r.storage)
    _print_verification(r)
    approx = [p.result.name for p in r.passes if p.result.approximate]
    click.echo("exact on the evidence (no approximate rewrite)" if r.exact_on_evidence
               else f"approximate rewrites by {', '.join(dict.fromkeys(approx))} (their output errors: the "
                    "verification lines above)")
    for m in r.messages:
        click.echo(m)
    for name, why in r.not_analysed:
        click.echo(f"not analysed: {name} ({why})")


def print_bench(comparison, names: list[str], batch_size: int) -> None:
    click.echo(f"batch size {batch_size} (samples/s counts the samples of each run)")
    click.echo(f"{'model':<48} {'median ms':>10} {'p90 ms':>9} {'samples/s':>10} {'vs first':>8}  verdict")
    for name, lat, ratio in zip(names, comparison.latencies, comparison.ratios, strict=True):
        click.echo(f"{name[-48:]:<48} {lat.median_ms:>10.3f} {lat.p90_ms:>9.3f} {lat.throughput:>10.1f} "
                   f"{ratio.ratio:>8.3f}  {ratio.verdict} ({ratio.low:.3f}-{ratio.high:.3f})")


def print_report(model: str, rep, per_node: bool) -> None:
    unknown = (f" ({rep.nodes_without_shapes} nodes without static shapes not counted: give --input-shape "
               "NAME=D1,D2,... for the dynamic sides)" if rep.nodes_without_shapes else "")
    by_dtype = getattr(rep, "params_by_dtype", None)
    dtypes = (" (" + ", ".join(f"{k} {v:,}" for k, v in by_dtype.items()) + ")") if by_dtype else ""
    click.echo(f"{model}\nparameters {rep.params:,}{dtypes}\nMACs/sample {rep.macs:,}{unknown}"
               f"\nfile bytes {rep.size_bytes:,}\nops: " + ", ".join(f"{k} {v}" for k, v in rep.op_histogram.items()))
    if per_node:
        click.echo(f"  {'node':<40} {'op':<18} {'MACs':>14} {'params':>10}")
        for n in rep.nodes:
            click.echo(f"  {n.name[:40]:<40} {n.op:<18} {fmt_int(n.macs):>14} {n.params:>10,}")


def print_sweep(rows: list[dict]) -> None:
    click.echo(f"{'threshold':>9} {'params':>10} {'layer':>10} {'skip':>8} {'MACs':>10} {'lat ms':>8} {'accuracy':>9}")
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        lat = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.3f}"
        click.echo(f"{r['threshold']:>9.2f} {r['params']:>10,} {r['layer_params']:>10,} {r['skip_params']:>8,} "
                   f"{r['macs']:>10,} {lat:>8} {acc:>9}")


def print_search(rows: list[dict]) -> None:
    """The candidates of ``optimize --objective``: figures, budget used, Pareto and chosen marks."""
    click.echo(f"{'':2}{'candidate':<58} {'MACs':>11} {'bytes':>10} {'lat x':>6} {'used':>7} {'in':>3} {'P':>2}")
    for r in rows:
        lat = "-" if r["latency_ratio"] is None else f"{r['latency_ratio']:.2f}"
        used = "-" if r["budget_used"] == float("inf") else f"{r['budget_used']:.3g}"
        mark = "*" if r["chosen"] else " "
        click.echo(f"{mark} {r['candidate'][:58]:<58} {r['macs']:>11,} {r['size_bytes']:>10,} {lat:>6} {used:>7} "
                   f"{'yes' if r['within_budget'] else 'no':>3} {'P' if r['pareto'] else '':>2}")
    click.echo("* chosen; P: on the Pareto front (objective against budget used); lat x: batch-1 latency vs original")
