"""The course's speed and memory claims, each measured in one run: `python -m course_lib.benchmarks kv|moe|mtp|ep`.

The command prints every measurement and the floor each claim must meet, and exits with status 1 when a
floor is missed (notebooks print the same ratios with their expected range, and never assert on time).

kv (notebooks 01 and 03):
- `decode_speed`: greedy decoding with and without the KV cache, for the cpu profile's baseline model
  (floor: cached at least 3x faster at 128 new tokens, batch 8: notebooks 00, 01 and 07 rely on it);
- `mla_decode_speed`: one decoding step over S cached tokens of MLA absorbed, MLA naive and MHA, on one
  attention layer with DeepSeek's proportions (C = 4·D and Dr = D/2 as in V2/V3, 16 heads);
- `cache_bytes`: cache bytes per token of notebook 03's MLA model and the MHA baseline, read off live caches.
moe (notebook 04):
- `dispatch_speed`: tokens/s of the four dispatches of `course_lib.moe` on a training-sized batch,
  forward and forward+backward, after checking that they agree;
- `moe_vs_dense`: a DeepSeekMoE layer against a dense SwiGLU as wide as its shared + K active experts.
mtp (notebook 09):
- `speculative_speed`: greedy decoding at batch 1, self-speculative vs plain cached, on MTP models of
  notebook 09's width with 3, 6 and 12 main blocks; the drafts are forced right at a chosen acceptance rate.
ep (notebook 10):
- `ep_parity`, `ep_node_limited`, `ep_stragglers`: expert parallelism on spawned gloo processes: outputs and
  gradients against one process, bytes per token against the formula, node-limited routing's cut in
  cross-group bytes, rank loads and waiting with and without aux-loss-free balancing.

The measurements live in `measure` (rows of numbers), the command line and its floors in `cli`.
"""
