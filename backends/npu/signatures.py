"""How the npu bindings call each torch_npu op: the number of positional arguments and the keyword
names. The glue tests check every recorded call against this table, and the opt-in drift test
(tests/test_npu_signatures.py) checks this table against the op schemas of a torch-npu wheel
(``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml``, read as text)."""

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
