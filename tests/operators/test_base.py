import numpy as np
import pyarrow as pa

from operators.base import as_table, mark_rejects, pending_rows, run_isolating_rows
from schemas.columns import REJECT_REASON, REJECT_STAGE


def test_dict_batches_become_tables_with_reject_columns():
    table = as_table({"image_id": np.array(["a", "b"], dtype=object)})
    assert table.column(REJECT_STAGE).to_pylist() == [None, None]
    assert pending_rows(table) == [0, 1]


def test_first_reject_reason_wins():
    table = as_table(pa.table({"image_id": ["a", "b", "c"]}))
    table = mark_rejects(table, "decode", {1: ("not_found", "no such file")})
    table = mark_rejects(table, "caption", {1: ("model_error", "boom"), 2: ("empty_caption", "")})
    assert table.column(REJECT_STAGE).to_pylist() == [None, "decode", "caption"]
    assert table.column(REJECT_REASON).to_pylist() == [None, "not_found", "empty_caption"]
    assert pending_rows(table) == [0]


def test_one_bad_row_costs_one_reject_not_the_batch():
    calls = []

    def fn(rows):
        calls.append(list(rows))
        if 2 in rows:
            raise RuntimeError("row 2 breaks the model")
        return {r: r * 10 for r in rows}

    done, rejects = run_isolating_rows([1, 2, 3], fn)
    assert done == {1: 10, 3: 30}
    assert rejects == {2: ("model_error", "RuntimeError: row 2 breaks the model")}
    assert calls[0] == [1, 2, 3]  # tried as a batch first
