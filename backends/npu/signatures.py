"""How the npu bindings call each torch_npu op: the number of positional arguments and the keyword
names. The glue tests check every recorded call against this table, and the opt-in drift test
(tests/test_npu_signatures.py) checks this table against a torch-npu wheel, read as text from the
zip: the op schemas the Python bindings are generated from (``SCHEMA_FILE``) and the documented
prototypes (``DOCS_FILE``)."""

import re

CALLS = {
    "npu_rotary_mul": (3, ("rotary_mode",)),
    "npu_apply_rotary_pos_emb": (4, ("layout", "rotary_mode")),
    "npu_moe_gating_top_k_softmax": (2, ("k",)),
    "npu_moe_gating_top_k": (2, ("k_group", "group_count", "group_select_mode", "renorm", "norm_type", "out_flag",
                                 "routed_scaling_factor", "eps")),
    "npu_moe_init_routing_v2": (2, ("active_num", "expert_num", "drop_pad_mode", "expert_tokens_num_type",
                                    "expert_tokens_num_flag", "quant_mode", "active_expert_range", "row_idx_type")),
    "npu_grouped_matmul": (2, ("group_list", "split_item", "group_type", "group_list_type", "output_dtype")),
    "npu_moe_finalize_routing": (7, ("drop_pad_mode", "k")),
    "npu_weight_quant_batchmatmul": (3, ("bias", "antiquant_group_size", "weight_dtype")),
    "npu_scatter_pa_kv_cache": (5, ("cache_mode",)),
    "npu_gather_pa_kv_cache": (6, ()),
}

# Keyword arguments the schema has and _op_plugin_docs.py does not document (yet).
UNDOCUMENTED = {("npu_weight_quant_batchmatmul", "weight_dtype")}
# Ops with a schema and no entry in _op_plugin_docs.py.
SCHEMA_ONLY = {"npu_gather_pa_kv_cache"}

SCHEMA_FILE = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
DOCS_FILE = "torch_npu/_op_plugin_docs.py"


def parse_signature(text: str, op: str):
    """``(positional names, keyword-only names)`` of the first ``op(...)`` prototype in ``text``
    (a schema line ``func: op(Tensor x, *, int k=1) -> ..`` or a documented prototype), or None."""

    match = re.search(rf"(?:^|[\s.:]){re.escape(op)}\(", text)
    if match is None:
        return None
    depth, start = 1, match.end()
    end = start
    while depth and end < len(text):
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        end += 1
    params, keyword_only = [], False
    positional, keywords = [], []
    for param in _split_top_level(text[start:end - 1]):
        if param == "*":
            keyword_only = True
            continue
        name = param.split("=", 1)[0].split()[-1] if param else ""
        params.append(name)
        (keywords if keyword_only else positional).append(name)
    return tuple(positional), tuple(keywords)


def _split_top_level(params: str) -> list[str]:
    out, depth, current = [], 0, ""
    for ch in params:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        out.append(current.strip())
    return out


def _docs_entry(docs: str, op: str) -> str:
    """The text of ``_add_torch_npu_docstr("op", ...)``, or ''."""
    match = re.search(rf'_add_torch_npu_docstr\(\s*"{re.escape(op)}",', docs)
    if match is None:
        return ""
    end = docs.find("_add_torch_npu_docstr(", match.end())
    return docs[match.end():end if end > 0 else len(docs)]


def drift(schema_text: str, docs_text: str) -> list[str]:
    """Every way the calls in :data:`CALLS` disagree with a wheel's schema and docs."""
    problems = []
    for op, (n_positional, keywords) in CALLS.items():
        schema = parse_signature("\n".join(line for line in schema_text.splitlines() if "func:" in line), op)
        entry = _docs_entry(docs_text, op)
        documented = parse_signature(entry, op) if entry else None
        if schema is None:
            problems.append(f"{op}: no schema in {SCHEMA_FILE}")
        if documented is None and op not in SCHEMA_ONLY:
            problems.append(f"{op}: no prototype in {DOCS_FILE}")
        for source, sig in ((SCHEMA_FILE, schema), (DOCS_FILE, documented)):
            if sig is None:
                continue
            positional, keyword_only = sig
            if len(positional) < n_positional:
                problems.append(f"{op}: called with {n_positional} positional arguments, "
                                f"{source} has {len(positional)}")
            names = set(positional) | set(keyword_only)
            for kw in keywords:
                if kw not in names and not (source == DOCS_FILE and (op, kw) in UNDOCUMENTED):
                    problems.append(f"{op}: keyword {kw!r} is not in {source}")
    return problems


def read_wheel(path) -> tuple[str, str]:
    """The schema and docs texts of a torch-npu wheel, read from the zip (nothing is imported)."""
    import zipfile

    with zipfile.ZipFile(path) as wheel:
        return wheel.read(SCHEMA_FILE).decode(), wheel.read(DOCS_FILE).decode()
