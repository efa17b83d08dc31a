"""Self-checks for the course's exercise notebooks.

Every exercise in ``exercises/*.ipynb`` is a function stub; the cell after it calls one of the
``check_*`` functions below with the learner's function. A check runs that function on the
bundled ``toy-ioi`` model (whatever model the notebook itself uses; 10_ioi_circuit's checks use
``toy-ioi-deep``), with its own four-prompt batch, cache and metric (copies, so a wrong answer
cannot change what the next check sees), and compares what comes back with the library's own
answer (:func:`patchwidgets.patch`, :mod:`patchwidgets.metrics`, :mod:`patchwidgets.ioi_circuit`):

* on success it prints exactly one line, ``✅ <exercise>: passed (...)``;
* on a wrong answer it raises :class:`GradingError` (an ``AssertionError``) that says what was
  expected, what came back and where the first mismatch is (for a sweep: the layer, position
  or head, with the token at that position), and, when the mistake is a common one, what the
  wrong answer looks like (patching ``resid_post`` instead of ``resid_pre``, say);
* on a stub that still raises ``NotImplementedError`` it re-raises ``NotImplementedError``, so
  the grader (``patchwidgets grade NOTEBOOK``, see :mod:`patchwidgets.cli`) can report the
  exercise as *not attempted* rather than *failed*;
* when the learner's function raises, a :class:`GradingError` that says where, and what the
  check passed in (and which notebook variables the function reads instead of its arguments).

The check cells in a notebook are for the learner. The grader does not run them or read their
output: it runs the learner's cells, then calls each check itself, from its own process, on the
learner's functions (see :mod:`patchwidgets.grading.grader`).

The course helpers :func:`ioi_batch` and :func:`normalized_ld_metric` build the data and the
metric the exercises use, so that the learner's experiment and the check's agree.
"""

from __future__ import annotations

from ._common import (  # noqa: F401
    GradingError,
    EXERCISES,
    PASS_MARK,
    bundled_model,
    ioi_batch,
    IOIBatch,
    normalized_ld_metric,
    NormalizedLDMetric,
    sweep_setup,
    library_grid,
)
from .check_metrics import (  # noqa: F401
    check_logit_diff,
    check_normalized_metric,
    check_noising_metric,
    check_logprob,
    check_prob,
    check_rank,
    check_kl,
)
from .check_sweeps import (  # noqa: F401
    check_patch_position,
    check_patched_run,
    check_get_act_patch_resid_pre,
    check_get_act_patch_block_every,
    check_patch_head_vector,
    check_get_act_patch_head_out,
    check_get_act_patch_head_out_by_pos,
    check_get_act_patch_head_every,
    check_mean_attention,
)
from .check_gates import (  # noqa: F401
    GATE_CLEAN,
    GATE_CORRUPTED,
    check_or_gate,
    check_patch_gate_components,
    check_gate_predictions,
    check_classify_component,
    check_patch_with_kl,
    check_ablate_head,
    library_ablation,
)
from .check_corruptions import (  # noqa: F401
    check_swap_names,
    check_abc_corruption,
    reference_swap_names,
    reference_abc_corruption,
)
from .check_advanced import (  # noqa: F401  (the private ones are used by tests/test_grading.py)
    check_path_patch_to_logits,
    check_path_patch_to_queries,
    check_circuit_edges,
    reference_circuit_edges,
    check_attribution_head_out,
    check_attribution_resid_pre,
    _library_path,
    _library_attribution,
)
from .check_nnsight import (  # noqa: F401  (nnsight itself is imported only when a check runs)
    check_record_resid_pre,
    check_patch_resid_pre,
    check_resid_pre_sweep,
    check_last_logits,
    nnsight_model,
)
from .check_circuit import (  # noqa: F401  (toy-ioi-deep is loaded only when a check runs)
    check_direct_logit_attribution,
    check_end_attention,
    check_copy_scores,
    check_path_at,
    check_mean_ablated_logit_diff,
    check_faithfulness,
    check_minimality,
    deep_model,
)

#: ``exercise name -> its check``, captured when this package is imported: the grader calls
#: these objects, never whatever ``grading.check_...`` names at the time.
CHECKS = {name: globals()[f"check_{name}"] for names in EXERCISES.values() for name in names}

__all__ = [
    "GradingError", "EXERCISES", "CHECKS", "PASS_MARK", "bundled_model", "ioi_batch", "IOIBatch",
    "normalized_ld_metric", "NormalizedLDMetric",
    # 02_metrics
    "check_logit_diff", "check_normalized_metric", "check_noising_metric", "check_logprob",
    "check_prob", "check_rank", "check_kl",
    # 03_residual_stream
    "check_patch_position", "check_patched_run", "check_get_act_patch_resid_pre", "check_get_act_patch_block_every",
    # 04_attention_heads
    "check_patch_head_vector", "check_get_act_patch_head_out", "check_get_act_patch_head_out_by_pos",
    "check_get_act_patch_head_every", "check_mean_attention",
    # 05_noising_denoising
    "check_or_gate", "check_patch_gate_components", "check_gate_predictions", "check_classify_component",
    "check_patch_with_kl", "check_ablate_head", "library_ablation",
    # 06_corrupted_prompts
    "check_swap_names", "check_abc_corruption", "reference_swap_names", "reference_abc_corruption",
    # 07_path_patching
    "check_path_patch_to_logits", "check_path_patch_to_queries", "check_circuit_edges", "reference_circuit_edges",
    # 08_attribution_patching
    "check_attribution_head_out", "check_attribution_resid_pre",
    # 09_nnsight
    "check_record_resid_pre", "check_patch_resid_pre", "check_resid_pre_sweep", "check_last_logits",
    "nnsight_model",
    # 10_ioi_circuit
    "check_direct_logit_attribution", "check_end_attention", "check_copy_scores", "check_path_at",
    "check_mean_ablated_logit_diff", "check_faithfulness", "check_minimality", "deep_model",
]
