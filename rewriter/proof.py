"""The proof a rewrite is judged by, done once in the driver for every backend that can run a model.

    original ─┐                       ┌─ model outputs    ─┐
              ├─ same inputs, size 1 ─┤                     ├─ compare (rewriter.verify.compare)
    written  ─┘   (and size 2)        └─ boundary tensors ─┘

Comparing only the model's outputs is not enough: a head that random weights saturate (a softmax
whose outputs sit at 1e-17) hides any difference in front of it. So each rewrite names the tensor
it replaces (its *boundary*: the Concat's output for a fusion, the grouped conv's for an
expansion, the folded op's for a fold), both models expose those as extra outputs, and each pair
is compared directly. A dynamic dim the verification chose (an unknown batch set to 1) is run at
a second size too: a bound folded from the batch, correct at 1 only, fails at 2.

A backend takes part with ``runner(path, role, extra)``: a callable ``feeds → {name: array}``
with ``inputs`` (InputSpecs for ``make_inputs``), ``outputs`` (the model's output names) and
``extra`` (the boundary names the model has). Backends without one prove the model outputs with
their own ``verify``, which the driver calls once per size.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rewriter.errors import VerificationImpossible
from rewriter.report import OutputComparison, Verification
from rewriter.verify import Feeds, compare, make_inputs


def second_shapes(shapes: dict[str, list[int]], defaulted: dict[str, list[int]], options) -> dict[str, list[int]] | None:
    """The shapes of the second run: each input whose unknown batch was set to 1 at 2 instead.
    None when no dim was chosen by the verification (fixed shapes, --shape for every dynamic
    dim, or --inputs): then the user's sizes are the only ones that mean anything."""
    if options.inputs is not None or not defaulted:
        return None
    second = dict(options.shapes)
    for name, positions in defaulted.items():
        dims = list(shapes[name])
        for position in positions:
            dims[position] = 2
        second[name] = dims
    return second


def at_second_size(verify, options, verification: Verification | None) -> Verification | None:
    """For a backend that proves its model outputs itself (``verify(options)``): run it again
    with the defaulted batch at 2, and join that run to the first one's verdict."""
    if verification is None or not verification.ran or verification.runs:
        return verification  # nothing ran, or the backend ran every size already (rewriter.proof)
    verification.runs.append({"inputs": dict(verification.inputs),
                              "outputs": [_row_dict(r) for r in verification.outputs]})
    more = second_shapes(verification.inputs, verification.defaulted, options) if verification.passed else None
    if more is None:
        return verification
    second = verify(replace(options, shapes=more, seed=options.seed + 1))
    label = ", ".join(f"{name}={'x'.join(map(str, dims))}" for name, dims in second.inputs.items())
    verification.runs.append({"inputs": dict(second.inputs), "outputs": [_row_dict(r) for r in second.outputs]})
    verification.outputs.extend(replace(r, name=f"{r.name} (at {label})") for r in second.outputs if not r.passed)
    if not second.passed:
        verification.passed = False
        verification.note = "; ".join(n for n in (verification.note, f"at {label}: {second.note}") if n)
    return verification


def _label(feeds: Feeds) -> str:
    return ", ".join(f"{name}={'x'.join(map(str, array.shape)) or 'scalar'}" for name, array in feeds.items())


def _boundaries(rewrites) -> dict[str, list]:
    """original tensor name → the boundary entries (dicts of ``Rewrite.boundary``) that compare it,
    for rewrites in the main graph (those in If/Loop bodies are run as models of their own)."""
    wanted: dict[str, list] = {}
    for rewrite in rewrites:
        if rewrite.graph:
            for entry in rewrite.boundary:
                entry.setdefault("note", "in a subgraph: proven by running the subgraph as its own model")
            continue
        for entry in rewrite.boundary:
            wanted.setdefault(entry["tensor"], []).append(entry)
    return wanted


def prove(backend, original: Path, written: Path, options, rewrites) -> Verification:
    """Run both models on the same inputs, at one size or two, and compare every model output and
    every boundary tensor; the boundary results go into each rewrite's ``boundary`` entries."""
    wanted = _boundaries(rewrites)
    reference = backend.runner(original, "original", list(wanted))
    first = make_inputs(reference.inputs, shapes=options.shapes, seed=options.seed, given=options.inputs,
                        outputs=reference.output_specs)
    sizes = [first]
    more = second_shapes(first.shapes(), first.defaulted, options)
    if more is not None:
        sizes.append(make_inputs(reference.inputs, shapes=more, seed=options.seed + 1, given=None,
                                 outputs=reference.output_specs))
    expected = [reference(feeds) for feeds in sizes]  # held, so the two sessions never live at once
    output_names = list(reference.outputs)
    present = [name for name in wanted if name in reference.extra]
    # The tensor that stands in the written model: the same name, unless the rewrite says another
    # (a Keras layer that takes a Concatenate's place has a name of its own).
    written_name = {name: wanted[name][0].get("written_tensor", name) for name in present}
    del reference
    used = dict(inputs=first.shapes(), defaulted=first.defaulted)
    try:
        candidate = backend.runner(written, "rewritten", [written_name[name] for name in present])
    except VerificationImpossible as exc:
        return Verification(ran=True, passed=False, atol=options.atol, rtol=options.rtol, note=exc.message, **used)
    if list(candidate.outputs) != output_names:
        return Verification(ran=True, passed=False, atol=options.atol, rtol=options.rtol,
                            note=f"outputs changed: {output_names} -> {list(candidate.outputs)}", **used)
    verification = Verification(ran=True, passed=True, atol=options.atol, rtol=options.rtol, **used)
    for n, (feeds, reference_values) in enumerate(zip(sizes, expected)):
        try:
            actual = candidate(feeds)
        except VerificationImpossible as exc:
            verification.passed, verification.note = False, exc.message
            return verification
        rows = [compare(name, reference_values[name], actual[name], options.atol, options.rtol)
                for name in output_names]
        _record_run(verification, n, feeds, rows)
        for name in present:
            if written_name[name] in candidate.extra:
                row = compare(name, reference_values[name], actual[written_name[name]], options.atol, options.rtol)
                for entry in wanted[name]:
                    _record_boundary(entry, row, feeds, verification, listed=name in output_names)
    for name in wanted:
        if name not in present:  # e.g. a Keras layer inside a nested model, or called twice
            note = "the original's run cannot expose this tensor; proven at the model outputs"
        elif written_name[name] not in candidate.extra:  # a later rewrite (a fold) consumed it
            note = "not in the written model (a later rewrite replaced it); proven at that rewrite's boundary"
        else:
            continue
        for entry in wanted[name]:
            entry.setdefault("note", note)
    _judge_proof(verification, rewrites)
    return verification


def _record_run(verification: Verification, n: int, feeds: Feeds, rows: list[OutputComparison]) -> None:
    """A run's rows: the first run's are the table (``outputs``); a later run's join the table only
    where they fail, named after the inputs' shapes; every run is listed in ``runs``."""
    verification.runs.append({"inputs": feeds.shapes(), "outputs": [_row_dict(r) for r in rows]})
    if n == 0:
        verification.outputs.extend(rows)
    else:
        verification.outputs.extend(replace(r, name=f"{r.name} (at {_label(feeds)})") for r in rows if not r.passed)
    if not all(r.passed for r in rows):
        verification.passed = False


def _row_dict(row: OutputComparison) -> dict:
    return {"name": row.name, "max_abs_error": row.max_abs_error, "max_rel_error": row.max_rel_error,
            "passed": row.passed, "informative": row.informative}


def _record_boundary(entry: dict, row: OutputComparison, feeds: Feeds, verification: Verification, *,
                     listed: bool) -> None:
    """Fold one run's comparison of a boundary tensor into its entry: the worst error over runs.
    A failing boundary joins the table unless it is a model output (``listed``: its row is there)."""
    entry["max_abs_error"] = max(entry.get("max_abs_error") or 0.0, row.max_abs_error)
    entry["max_rel_error"] = max(entry.get("max_rel_error") or 0.0, row.max_rel_error)
    entry["passed"] = bool(entry.get("passed", True) and row.passed)
    entry["informative"] = bool(entry.get("informative", False) or row.informative)
    if row.note and not row.passed:
        entry["note"] = row.note
    if not row.passed:
        verification.passed = False
        if not listed:
            verification.outputs.append(replace(row, name=f"boundary {row.name} (at {_label(feeds)})"))


def _judge_proof(verification: Verification, rewrites) -> None:
    """Say which rewrite failed at its boundary; say where the outputs proved nothing."""
    failed = [r.location for r in rewrites if any(e.get("passed") is False for e in r.boundary)]
    notes = [verification.note] if verification.note else []
    if failed:
        notes.append(f"rewrites {', '.join(failed)} differ at their boundary")
    flat = [o.name for o in verification.outputs if not o.informative]
    if flat:
        notes.append(f"outputs {', '.join(flat)} are constant or non-finite for these inputs and prove nothing")
    verification.note = "; ".join(notes)
