"""The proof a rewrite is judged by, done once in the driver for every backend that can run a model.

    original ─┐                       ┌─ model outputs    ─┐
              ├─ same inputs, size 1 ─┤                     ├─ compare (gconv_rewrite.verify.compare)
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

from gconv_rewrite.errors import VerificationImpossible
from gconv_rewrite.report import OutputComparison, Verification
from gconv_rewrite.verify import Feeds, compare, make_inputs


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
        return verification  # nothing ran, or the backend ran every size already (gconv_rewrite.proof)
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


def boundaries(rewrites) -> dict[str, list]:
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
    every boundary tensor; the boundary results go into each rewrite's ``boundary`` entries.

    A runner with ``start(sizes)`` (a Keras file's reference process, ``gconv_rewrite.passes.keras.reference``)
    runs the original elsewhere while the written model loads and runs here; its values, and the
    boundary tensors it could expose, are awaited only for the comparison."""
    wanted = boundaries(rewrites)
    reference = backend.runner(original, "original", list(wanted))
    sizes = verification_sizes(reference.inputs, reference.output_specs, options)
    awaited, exposed = _start_reference(reference, sizes, wanted)
    output_names = list(reference.outputs)
    del reference  # an in-process original is run already: the two sessions never live at once
    # The tensor that stands in the written model: the same name, unless the rewrite says another
    # (a Keras layer that takes a Concatenate's place has a name of its own).
    written_name = {name: entries[0].get("written_tensor", name) for name, entries in wanted.items()}
    used = dict(inputs=sizes[0].shapes(), defaulted=sizes[0].defaulted)
    try:
        candidate = backend.runner(written, "rewritten",
                                   [written_name[name] for name in (wanted if exposed is None else exposed)])
    except VerificationImpossible as exc:
        return Verification(ran=True, passed=False, atol=options.atol, rtol=options.rtol, note=exc.message, **used)
    if list(candidate.outputs) != output_names:
        return Verification(ran=True, passed=False, atol=options.atol, rtol=options.rtol,
                            note=f"outputs changed: {output_names} -> {list(candidate.outputs)}", **used)
    actual, failure = _run_written(candidate, sizes)
    expected, reference_extra = awaited()
    present = [name for name in wanted if name in reference_extra]
    verification = Verification(ran=True, passed=True, atol=options.atol, rtol=options.rtol, **used)
    for n, (feeds, reference_values, values) in enumerate(zip(sizes, expected, actual)):
        rows = [compare(name, reference_values[name], values[name], options.atol, options.rtol)
                for name in output_names]
        _record_run(verification, n, feeds, rows)
        for name in present:
            if written_name[name] in candidate.extra:
                row = compare(name, reference_values[name], values[written_name[name]], options.atol, options.rtol)
                for entry in wanted[name]:
                    _record_boundary(entry, row, feeds, verification, listed=name in output_names)
    if failure is not None:
        verification.passed, verification.note = False, failure
        return verification
    _note_unexposed(wanted, present, {written_name[name] for name in present} - set(candidate.extra), written_name)
    _judge_proof(verification, rewrites)
    return verification


def verification_sizes(inputs, output_specs, options) -> list[Feeds]:
    """The verification inputs for a model with ``inputs`` (InputSpecs): the user's or seeded
    ones, and a second size where a dynamic dim was chosen (``second_shapes``). The same options
    give the same arrays: a reference run elsewhere may be asked for them before ``prove``."""
    first = make_inputs(inputs, shapes=options.shapes, seed=options.seed, given=options.inputs, outputs=output_specs)
    sizes = [first]
    more = second_shapes(first.shapes(), first.defaulted, options)
    if more is not None:
        sizes.append(make_inputs(inputs, shapes=more, seed=options.seed + 1, given=None, outputs=output_specs))
    return sizes


def _start_reference(reference, sizes: list[Feeds], wanted: dict):
    """The original's values at each size, awaited by a call that gives ``(values per size, the
    boundary names it exposed)``; and the boundary names to ask the written model for (None: all
    of them, as an original run elsewhere says which it exposed only with its values)."""
    start = getattr(reference, "start", None)
    if start is not None:
        return start(sizes), None
    expected = [reference(feeds) for feeds in sizes]  # held, so the two sessions never live at once
    exposed = [name for name in wanted if name in reference.extra]
    return (lambda: (expected, exposed)), exposed


def _run_written(candidate, sizes: list[Feeds]) -> tuple[list[dict], str | None]:
    """The written model's values at each size, up to the first size it cannot run at (and why)."""
    actual = []
    for feeds in sizes:
        try:
            actual.append(candidate(feeds))
        except VerificationImpossible as exc:
            return actual, exc.message
    return actual, None


def _note_unexposed(wanted: dict, present: list[str], consumed: set[str], written_name: dict) -> None:
    """Say, in each boundary entry no run compared, why not."""
    for name in wanted:
        if name not in present:  # e.g. a Keras layer inside a nested model, or called twice
            note = "the original's run cannot expose this tensor; proven at the model outputs"
        elif written_name[name] in consumed:  # a later rewrite (a fold) consumed it
            note = "not in the written model (a later rewrite replaced it); proven at that rewrite's boundary"
        else:
            continue
        for entry in wanted[name]:
            entry.setdefault("note", note)


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
