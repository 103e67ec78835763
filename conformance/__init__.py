"""apt_hal.conformance: every backend checked against the CPU reference, with a report per backend.

One op contract, verified on every vendor:

* **Cases** (``spec``, ``cases_*``): per op, sample inputs (small, large, odd sizes, non-contiguous
  views, empty tensors), edge values where the spec defines behaviour (zeros, subnormals, the
  largest values, ±Inf and NaN) and error inputs that must raise naming the argument. Inputs are
  generated on the CPU from a seed and copied to the device with their exact layout, so every
  backend sees the same bytes. ``mxfp4_quantize`` checks ``apt_hal.mxfp4.quantize`` on the device
  bit for bit against the CPU.
* **Claims**: ``Backend.claims`` says which ops, dtypes and features (the vocabulary is each
  ``OpSpec.features``) a backend holds itself to. Cases outside them are UNSUPPORTED, not silently
  skipped; a claimed case that fails is a FAIL.
* **Running** (``runner``): the backend runs through the public op under
  ``apt_hal.use(backend, strict=True)``, so a fallback to the reference is an ERROR, never a pass;
  the oracle is ``op.reference`` on CPU copies of the same inputs.
* **Tolerances** (``tolerances.json``, read by ``tolerances``): one table keyed by
  (op, output, dtype, backend), each entry with its reason; exact bytes for indices, packed data and
  paged data; strict and relaxed relative-error bands for floats; NaN never passes.
* **Statuses** (``status``): PASS, QUALITY_WARNING, FAIL, ERROR, XFAIL, XPASS (``known_failures.json``),
  UNSUPPORTED, NOT_RUN (with the probe's reason), INFRA_ERROR.
* **Reports** (``reports``, ``report_html``, ``repro``): schema-versioned JSON, JUnit XML, a Markdown
  matrix and a self-contained HTML page; a reproduction bundle per failure; reports of several CI
  jobs merge into one matrix.
* **CLI** (``cli``): ``apt-hal conformance --backend all --report DIR [--quick] [--seed N] [--op OP]
  [--case ID] [--require NAMES]`` and ``apt-hal conformance --merge DIR... --report OUT``.
* **Compile matrix** (``compile_matrix``): ``apt-hal conformance --compile-only --target
  gfx942,gfx950,sm_90,sm_100`` compiles every Triton kernel for GPUs that are not here; a level
  of its own in the reports, below numerics on hardware and never a pass.

From Python::

    import pathlib
    from apt_hal.conformance import reports, runner
    report = runner.run(["cpu", "cuda-triton"], quick=True)
    reports.write_all(report, pathlib.Path("out"))
"""
