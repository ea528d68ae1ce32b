"""bench/step_profile.py's grouping of XLA fusions (by the op_name XLA keeps from the
JAX trace) and its table."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'bench'))
import step_profile  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize('op_name, want', [
    ('jit(train_step)/jvp(Decoder.forward)/block_0/mlp/up/dot_general', ('mlp dots', 'fwd')),
    ('jit(train_step)/transpose(jvp(Decoder.forward))/block_3/mlp/jit(silu)/mul',
     ('mlp elementwise', 'bwd')),
    ('jit(train_step)/transpose(jvp(Decoder.forward))/block_1/block_1.attend/attn/'
     'attn.project_out/out/dot_general', ('attn out proj', 'bwd')),
    ('jit(train_step)/jvp(Decoder.forward)/block_0/block_0.attend/attn/attn.project/'
     'query/dot_general', ('qkv proj', 'fwd')),
    ('jit(train_step)/jvp(Decoder.forward)/block_2/block_2.attend/attn/'
     'attn._attend_groups/transpose', ('attention kernel', 'fwd')),
    ('jit(train_step)/jvp()/while/body/closed_call/bcv,ev->bce/dot_general',
     ('head + loss', 'fwd')),
    # The blockwise kernel's loops are attention, not the chunked loss's loop.
    ('jit(train_step)/transpose(jvp(Decoder.forward))/block_1/block_1.attend/attn/'
     'attn._attend_groups/while/body/closed_call/while/body/bkqs,bkqd->bksd/dot_general',
     ('attention kernel', 'bwd')),
    ('jit(train_step)/jvp(Decoder.forward)/block_0/attn_norm/mul', ('norms', 'fwd')),
    ('jit(train_step)/add', ('optimizer/other', 'other')),
])
def test_fusions_are_grouped_by_op_name(op_name, want):
  assert step_profile._xenith_group(op_name) == want  # pylint: disable=protected-access


def test_table_shares_and_totals():
  results = {'xenith': {'groups_ms': {'mlp dots|fwd': 30.0, 'norms|bwd': 10.0},
                        'wall_ms_per_step': 25.0},
             'hf': {'groups_ms': {'mlp dots|fwd': 20.0}, 'wall_ms_per_step': 20.0}}
  text = step_profile.table(results)
  assert '| mlp dots fwd | 30.0 (75%) | 20.0 (100%) |' in text
  assert '| norms bwd | 10.0 (25%) | 0.0 (0%) |' in text
  assert '| **sum of groups** | 40.0 | 20.0 |' in text
