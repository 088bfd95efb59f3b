import math

import pytest
import torch

from rlflow.utils import torch_functional as F
from rlflow.utils.torch_functional import (
    compute_position_ids,
    entropy_from_logits,
    get_response_mask,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    pad_2d_list_to_tensor,
    postprocess_data,
)

PAD = 0


def _ids(rows):
    return torch.tensor(rows, dtype=torch.long)


# ---------------------------------------------------------------- postprocess_data


def test_left_pad_to_max_length():
    ids = _ids([[5, 6, 7]])
    mask = torch.ones_like(ids)
    out_ids, out_mask = postprocess_data(ids, mask, 5, PAD, left_pad=True)
    assert out_ids.tolist() == [[0, 0, 5, 6, 7]]
    assert out_mask.tolist() == [[0, 0, 1, 1, 1]]
    assert out_ids.dtype == torch.long and out_mask.dtype == mask.dtype


def test_right_pad_to_max_length_keeps_existing_mask():
    ids = _ids([[5, 6, 9], [1, 2, 3]])
    mask = _ids([[1, 1, 0], [1, 1, 1]])
    out_ids, out_mask = postprocess_data(ids, mask, 4, pad_token_id=9, left_pad=False)
    assert out_ids.tolist() == [[5, 6, 9, 9], [1, 2, 3, 9]]
    assert out_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]


def test_exact_length_is_unchanged():
    ids = _ids([[1, 2, 3]])
    mask = torch.ones_like(ids)
    out_ids, out_mask = postprocess_data(ids, mask, 3, PAD)
    assert torch.equal(out_ids, ids) and torch.equal(out_mask, mask)


def test_one_dim_input_keeps_rank():
    ids = _ids([4, 5])
    out_ids, out_mask = postprocess_data(ids, torch.ones_like(ids), 4, PAD)
    assert out_ids.shape == (4,)
    assert out_ids.tolist() == [0, 0, 4, 5]
    assert out_mask.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("left", [4, 5, 6, 7]),
        ("right", [1, 2, 3, 4]),
        ("middle", [1, 2, 6, 7]),
    ],
)
def test_truncation_modes_even(mode, expected):
    ids = _ids([[1, 2, 3, 4, 5, 6, 7]])
    mask = torch.ones_like(ids)
    out_ids, out_mask = postprocess_data(ids, mask, 4, PAD, truncation=mode)
    assert out_ids.tolist() == [expected]
    assert out_mask.tolist() == [[1, 1, 1, 1]]


def test_middle_truncation_odd_keeps_floor_head_ceil_tail_like_verl():
    ids = _ids([[1, 2, 3, 4, 5, 6, 7]])
    mask = _ids([[0, 1, 1, 1, 1, 1, 1]])
    out_ids, out_mask = postprocess_data(ids, mask, 5, PAD, truncation="middle")
    # floor(5/2) = 2 from the front, ceil(5/2) = 3 from the back
    assert out_ids.tolist() == [[1, 2, 5, 6, 7]]
    assert out_mask.tolist() == [[0, 1, 1, 1, 1]]


def test_middle_truncation_max_length_one():
    ids = _ids([[1, 2, 3]])
    out_ids, _ = postprocess_data(ids, torch.ones_like(ids), 1, PAD, truncation="middle")
    assert out_ids.tolist() == [[3]]  # no head token, one tail token


def test_truncation_error_message_names_lengths_and_options():
    ids = _ids([[1, 2, 3, 4, 5, 6]])
    with pytest.raises(ValueError) as err:
        postprocess_data(ids, torch.ones_like(ids), 4, PAD, truncation="error")
    msg = str(err.value)
    assert "6" in msg and "4" in msg
    assert "data.max_prompt_length" in msg and "data.truncation" in msg


def test_unknown_truncation_lists_modes():
    ids = _ids([[1, 2]])
    with pytest.raises(ValueError, match="left.*right.*middle.*error"):
        postprocess_data(ids, torch.ones_like(ids), 4, PAD, truncation="drop")


def test_shape_mismatch_and_bad_max_length():
    ids = _ids([[1, 2]])
    with pytest.raises(ValueError, match="attention_mask"):
        postprocess_data(ids, torch.ones(1, 3, dtype=torch.long), 4, PAD)
    with pytest.raises(ValueError, match="max_length"):
        postprocess_data(ids, torch.ones_like(ids), 0, PAD)


# ---------------------------------------------------------------- position ids


def test_position_ids_left_padding():
    mask = _ids([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert compute_position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


# ---------------------------------------------------------------- log-probs / entropy


def _naive_logprob(logits_row, label):
    m = max(logits_row)
    lse = m + math.log(sum(math.exp(v - m) for v in logits_row))
    return logits_row[label] - lse


def test_logprobs_match_naive_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7) * 3
    labels = torch.randint(0, 7, (2, 3))
    got = logprobs_from_logits(logits, labels)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    for b in range(2):
        for t in range(3):
            want = _naive_logprob(logits[b, t].tolist(), int(labels[b, t]))
            assert got[b, t].item() == pytest.approx(want, abs=1e-5)


def test_logprobs_bf16_are_float32_and_chunked(monkeypatch):
    torch.manual_seed(1)
    monkeypatch.setattr(F, "_LOGIT_CHUNK_ROWS", 2)  # force several chunks
    logits = (torch.randn(3, 5, 11) * 2).to(torch.bfloat16)
    labels = torch.randint(0, 11, (3, 5))
    got = logprobs_from_logits(logits, labels)
    assert got.dtype == torch.float32
    want = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_logprobs_gradient_matches_log_softmax():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 6, requires_grad=True)
    labels = torch.randint(0, 6, (2, 4))
    logprobs_from_logits(logits, labels).sum().backward()
    ref = logits.detach().clone().requires_grad_(True)
    torch.log_softmax(ref, -1).gather(-1, labels[..., None]).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad)


def test_logprobs_shape_error():
    with pytest.raises(ValueError, match="labels"):
        logprobs_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_entropy_uniform_and_naive():
    uniform = torch.zeros(1, 2, 8)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((1, 2), math.log(8)))
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 5)
    got = entropy_from_logits(logits.to(torch.bfloat16))
    assert got.dtype == torch.float32
    for b in range(2):
        for t in range(3):
            row = logits[b, t].to(torch.bfloat16).double().tolist()
            z = sum(math.exp(v) for v in row)
            want = -sum((math.exp(v) / z) * (v - math.log(z)) for v in row)
            assert got[b, t].item() == pytest.approx(want, abs=1e-5)


# ---------------------------------------------------------------- masked statistics


def test_masked_sum_and_mean_ignore_nan_at_invalid():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_sum(x, mask).item() == 13.0
    assert masked_mean(x, mask).item() == pytest.approx(13.0 / 4)
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 5.0]))
    torch.testing.assert_close(masked_sum(x, mask, dim=0), torch.tensor([5.0, 2.0, 6.0]))


def test_masked_mean_empty_row_is_zero():
    x = torch.tensor([[1.0, 3.0], [7.0, 9.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([2.0, 0.0]))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_var_unbiased_and_biased():
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, 5.0, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    vals = [1.0, 2.0, 4.0]
    mean = sum(vals) / 3
    ss = sum((v - mean) ** 2 for v in vals)
    assert masked_var(x, mask).item() == pytest.approx(ss / 2)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(ss / 3)
    one = torch.tensor([[1, 0, 0], [0, 0, 0]])
    assert masked_var(x, one).item() == 0.0


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, 7.0, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    vals = [1.0, 2.0, 4.0, 7.0]
    mean = sum(vals) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 3 + 1e-8)
    want = torch.tensor(
        [[(1 - mean) / std, (2 - mean) / std, 0.0], [(4 - mean) / std, (7 - mean) / std, 0.0]]
    )
    torch.testing.assert_close(masked_whiten(x, mask), want)
    want_noshift = torch.where(mask.bool(), want + mean, torch.tensor(0.0))
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), want_noshift)


def test_masked_shape_mismatch():
    with pytest.raises(ValueError, match="mask"):
        masked_mean(torch.zeros(2, 3), torch.ones(2, 2))


# ---------------------------------------------------------------- response mask / padding


def test_response_mask_first_eos_inclusive():
    eos = 2
    resp = _ids([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    assert get_response_mask(resp, eos, pad_token_id=0).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
    ]


def test_response_mask_multiple_eos_ids_and_trailing_pad():
    resp = _ids([[5, 3, 7, 7], [5, 9, 9, 2], [0, 4, 0, 0]])
    mask = get_response_mask(resp, [2, 3], pad_token_id=0)
    # row 0 stops at eos 3; row 1 at eos 2; row 2 has no eos: only trailing pads are dropped
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]


def test_response_mask_pad_equal_to_eos():
    resp = _ids([[5, 6, 2, 2, 2]])
    assert get_response_mask(resp, 2, pad_token_id=2).tolist() == [[1, 1, 1, 0, 0]]


def test_pad_2d_list():
    rows = [[1, 2, 3], [4], []]
    assert pad_2d_list_to_tensor(rows, 0).tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert pad_2d_list_to_tensor(rows, -1, left_pad=True, max_length=4).tolist() == [
        [-1, 1, 2, 3],
        [-1, -1, -1, 4],
        [-1, -1, -1, -1],
    ]
    out = pad_2d_list_to_tensor([torch.tensor([1, 2]), [3]], 9)
    assert out.dtype == torch.long and out.tolist() == [[1, 2], [3, 9]]
    with pytest.raises(ValueError, match="max_length"):
        pad_2d_list_to_tensor(rows, 0, max_length=2)
